"""``python -m services.agent``: the llama.cpp agent (log worker plus direct RPCs)."""

from services.agent.server import main

raise SystemExit(main())
