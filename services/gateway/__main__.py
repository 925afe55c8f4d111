"""``python -m services.gateway``: the public entry point of the mesh."""

from services.gateway.server import main

raise SystemExit(main())
