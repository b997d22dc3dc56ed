"""`dsv4 serve`: an OpenAI-compatible HTTP server with continuous batching."""
