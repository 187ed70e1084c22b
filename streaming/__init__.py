"""The sans-I/O streaming session: PCM in, events out (no torch, no sockets)."""
