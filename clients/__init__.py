"""Clients: microphone CLI, file streamer, load generator and a small Python client."""
