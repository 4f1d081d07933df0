"""Every benchmark runs in --quick mode and writes well-formed results.

A smoke test of ``make bench``'s code, not a benchmark: nothing here looks at how fast
anything was (no timing asserts), only that each benchmark runs end to end through
``python -m bench`` and reports figures that are there, finite and of the right kind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("overhead", "registration", "throughput", "scaling", "profile", "transaction")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _check_result(result: dict[str, Any], name: str) -> None:
    assert result["schema"] == 1
    assert result["name"] == name
    assert result["quick"] is True
    assert isinstance(result["title"], str)
    assert result["title"]
    assert result["seconds"] >= 0
    assert result["tables"], "a benchmark shows at least one table"
    for table in result["tables"]:
        assert table["title"]
        assert table["columns"]
        assert table["rows"], f"table {table['title']!r} is empty"
        for row in table["rows"]:
            assert len(row) == len(table["columns"]), table["title"]
            for cell in row:
                assert cell is None or isinstance(cell, (str, int, float))
                if isinstance(cell, float):
                    assert math.isfinite(cell), (table["title"], row)
    assert result["metrics"], "a benchmark reports machine-readable figures"
    for key, value in result["metrics"].items():
        assert isinstance(value, (int, float)), key
        assert math.isfinite(value), key
        # Durations, rates, sizes and ratios are never negative; differences
        # (``extra_ms``, ``growth_mb``) may be.
        if key.endswith(("_us", "_ms", "_per_s", "_mb", "_ratio", "_cores")) and not key.endswith(
            ("extra_ms", "growth_mb")
        ):
            assert value >= 0, key
    if name != "profile":  # the issue sets no goal for the profile, only a floor
        assert result["goals"], "a benchmark says which of the issue's goals it checked"
    for goal in result["goals"]:
        assert goal["text"]
        assert goal["met"] in (True, False, None)
        assert goal["detail"]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_quick_and_reports(name: str, tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "bench", name, "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / f"{name}.json").read_text())
    _check_result(result, name)
    assert result["environment"]["cores"] >= 1
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["quick"] is True
    assert summary["failed"] == []
    assert [r["name"] for r in summary["results"]] == [name]
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Benchmark results")
    assert result["title"] in report
    assert result["title"] in done.stdout
    if name == "overhead":
        _check_tools_were_used(result)


def _check_tools_were_used(result: dict[str, Any]) -> None:
    """The parts that need valgrind and wrk ran wherever those are installed (CI's)."""
    required = os.environ.get("MMOLOVE_REQUIRE_ALL_TESTS") == "1"
    for tool, metric in (("valgrind", "instructions.bare.ratio"), ("wrk", "gunicorn.bare.ratio")):
        if shutil.which(tool) is not None or required:
            assert metric in result["metrics"], f"{tool} is installed but {metric} is missing"


def test_unknown_benchmark_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "nonsense", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "unknown benchmark" in done.stderr


def test_list_names_every_benchmark() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for name in BENCHMARKS:
        assert name in done.stdout
