"""Benchmarks of flask-mmolove against baselines measured in the same run (make bench)."""

from __future__ import annotations

from pathlib import Path

#: The repository: where helper processes run, and whose commit a report names.
ROOT = Path(__file__).resolve().parent.parent
