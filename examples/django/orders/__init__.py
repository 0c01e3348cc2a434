"""Products with a stock, and orders that take from it."""
