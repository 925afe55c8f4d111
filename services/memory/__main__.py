"""``python -m services.memory``: the retrieval memory service."""

from services.memory.server import main

raise SystemExit(main())
