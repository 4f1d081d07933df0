"""``python -m example_app`` (``make demo``): run the demo portal."""

from __future__ import annotations

from .demo import main

if __name__ == "__main__":
    raise SystemExit(main())
