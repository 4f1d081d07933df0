"""Entry point for ``python -m flask_mmolove.sandbox``."""

from __future__ import annotations

from .command import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
