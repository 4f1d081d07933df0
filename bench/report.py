"""The report of a run: the machine it ran on, and the results as Markdown tables
(``report.md``, the tables of docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import ROOT
from .results import Cell, Result


def environment() -> dict[str, Any]:
    """What the figures were measured on."""
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def fmt(value: Cell) -> str:
    """A figure to three significant digits or so; ratios keep three decimals."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        size = abs(value)
        if size >= 100:
            return f"{value:,.0f}"
        if size >= 10:
            return f"{value:.1f}"
        if size >= 1:
            return f"{value:.3f}" if size < 2 else f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def render_markdown(results: Sequence[Result], env: Mapping[str, Any], *, quick: bool) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"{'Quick smoke run (not figures)' if quick else 'Full run'}; "
        f"commit {env.get('commit')}, {env.get('date')}; Python {env.get('python')} on "
        f"{env.get('cores')} cores ({env.get('cpu')}).",
        "",
    ]
    for result in results:
        lines += [f"## {result.title} (`{result.name}`, {result.seconds:.0f} s)", ""]
        for goal in result.goals:
            mark = {True: "met", False: "NOT met", None: "not decided"}[goal.met]
            lines.append(f"- Goal: {goal.text} — **{mark}**: {goal.detail}")
        if result.goals:
            lines.append("")
        for table in result.tables:
            lines += [f"**{table.title}**", ""]
            lines.append("| " + " | ".join(table.columns) + " |")
            lines.append("|" + "---|" * len(table.columns))
            for row in table.rows:
                lines.append("| " + " | ".join(fmt(cell) for cell in row) + " |")
            lines.append("")
        for note in result.notes:
            lines.append(f"- {note}")
        if result.notes:
            lines.append("")
    return "\n".join(lines)
