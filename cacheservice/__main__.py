"""``python -m cacheservice serve ...`` (same as the ``cacheservice`` console script)."""

from __future__ import annotations

from cacheservice.cli import main

raise SystemExit(main())
