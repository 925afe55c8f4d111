"""The mesh's shared runtime: settings, errors, interceptors, server scaffolding, metrics, the
log, memory stores, the llama.cpp engine, launchers and the client CLI.

Import the submodules directly (``mesh.log``, ``mesh.errors``); this package keeps its own import
cheap so every service and CLI start stays fast.
"""
