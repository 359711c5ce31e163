"""The HTTP translation service: FastAPI app, request batching, limits, metrics and a web page."""
