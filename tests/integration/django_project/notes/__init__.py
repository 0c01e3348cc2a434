"""A model with a few fields, its admin, and the tests Django's test runner runs on pgreuse."""
