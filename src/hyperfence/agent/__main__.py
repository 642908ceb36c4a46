"""`python3 -m hyperfence.agent --config FILE` (the zipapp has its own root __main__.py doing the same)."""

from __future__ import annotations

from hyperfence.agent.main import main

raise SystemExit(main())
