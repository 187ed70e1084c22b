"""The asyncio server: WebSocket endpoint, WebRTC ingress, the browser page, health and metrics."""
