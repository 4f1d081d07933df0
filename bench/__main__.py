"""``python -m bench [NAME ...] [--quick] [--out DIR]``: run the benchmarks (``make bench``).

Without a name, every benchmark runs, in the order of the issue. Each writes
``<out>/<name>.json``; the run writes ``<out>/results.json`` (everything, with the
machine it ran on) and ``<out>/report.md`` (the tables of docs/benchmarks.md), and
prints the report. ``--quick`` is a smoke run: tiny sizes, seconds instead of minutes,
figures not worth quoting.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from . import ROOT
from .report import environment, render_markdown
from .results import SCHEMA_VERSION, Result

BENCHMARKS = {
    "overhead": "bench.overhead",
    "registration": "bench.registration",
    "throughput": "bench.throughput",
    "scaling": "bench.scaling",
    "profile": "bench.breakdown",
    "transaction": "bench.transaction",
}
DEFAULT_OUT = ROOT / "bench" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--quick", action="store_true", help="a fast smoke run, not figures")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results directory (default: %(default)s)"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, module in BENCHMARKS.items():
            print(f"{name:14} {importlib.import_module(module).TITLE}")
        return 0
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    results: list[Result] = []
    failed: list[str] = []
    started = time.monotonic()
    for name in names:
        print(f"== {name}{' (quick)' if args.quick else ''}", file=sys.stderr, flush=True)
        begun = time.monotonic()
        try:
            result: Result = importlib.import_module(BENCHMARKS[name]).run(args.quick)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        result.seconds = time.monotonic() - begun
        results.append(result)
        (out / f"{name}.json").write_text(
            json.dumps({"environment": env, **result.to_json()}, indent=2) + "\n"
        )
        print(f"   {result.seconds:.0f} s", file=sys.stderr, flush=True)
    summary = {
        "schema": SCHEMA_VERSION,
        "environment": env,
        "quick": args.quick,
        "seconds": time.monotonic() - started,
        "failed": failed,
        "results": [result.to_json() for result in results],
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = render_markdown(results, env, quick=args.quick)
    (out / "report.md").write_text(report + "\n")
    print(report)
    print(f"results in {out} ({summary['seconds']:.0f} s)", file=sys.stderr)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
