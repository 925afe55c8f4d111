"""The gateway's OpenAI-compatible HTTP API (docs/openai.md), on the same ``GatewayCore``.

``app.build_app`` assembles the aiohttp application; ``app.HttpListener`` starts and stops it
next to the gRPC server.
"""

from services.gateway.http.app import HttpListener, build_app

__all__ = ["HttpListener", "build_app"]
