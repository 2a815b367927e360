"""The web view of a running `lockgate up` (read-only) and its Git webhook receiver, on aiohttp."""
