"""OpenAI-compatible serving: continuous-batching scheduler, HTTP API (`app.py`) and a web chat page."""
