"""The gateway: the mesh's public entry point (auth, rate limits, turn log, token streams).

``server`` is the gRPC face and ``main``; ``core`` holds the logic (no protobuf); ``hub`` fans
the turn-event log out to streams (records are ``mesh.turnlog`` events); ``persister`` is the
client of the conversation store; ``settings`` reads ``MESH_GATEWAY_*``.
"""
