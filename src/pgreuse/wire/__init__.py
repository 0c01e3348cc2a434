"""Sans-IO protocol code: never imports socket, selectors, time or anyio."""
