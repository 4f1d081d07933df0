"""1. Request overhead: the same portal with and without flask-mmolove.

In process: WSGI calls straight into each app (no HTTP, no test client), so nothing
dilutes the extension's cost; this is the harshest view. Under gunicorn (one sync
worker pinned to one core) with ``wrk`` on the other core: what a visitor's request
costs end to end. Both portals serve the same requests; the only difference is
``MMOLove().init_app(app)``.
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask
from werkzeug.test import EnvironBuilder

from flask_mmolove import MMOLove
from flask_mmolove.sandbox.tokens import TokenMinter

from . import ROOT
from .databases import sqlite_url
from .portals import plain_portal, referral_portal
from .processes import Child, children, free_port, pinned, python_env, wait_for_port, which
from .results import Cell, Result, Table
from .stats import median, median_interval, paired_ratios
from .timing import interleaved

NAME = "overhead"
TITLE = "Request overhead"
#: Requests served before anything is measured (first-request setup, caches).
WARM_UP = 100
GOAL = 1.05
PORTALS = ("plain", "referral")


@dataclass(frozen=True)
class Kind:
    key: str
    label: str
    token: bool
    path: str
    query: str = ""
    cookie: str = ""


def session_cookie(app: Flask, data: dict[str, Any]) -> str:
    serializer = app.session_interface.get_signing_serializer(app)  # type: ignore[attr-defined]
    return f"session={serializer.dumps(data)}"


def request_kinds(app: Flask) -> list[Kind]:
    token = TokenMinter("bench-token-key").mint("bench-server", "friend")
    pending = f"mmref={token}; {session_cookie(app, {'mmolove_mmref': token})}"
    return [
        Kind("bare", "no token: no query, no cookies", False, "/"),
        Kind("query", "no token: a query string", False, "/", "page=2&sort=new"),
        Kind("cookies", "no token: analytics cookies", False, "/", "", "_ga=GA1.2.3.4; ok=1"),
        Kind(
            "session",
            "no token: logged-in page (reads the session)",
            False,
            "/account",
            "",
            session_cookie(app, {"user": "u42"}),
        ),
        Kind("landing", "token: landing from MMOLove (?mmref=)", True, "/", f"mmref={token}"),
        Kind("pending", "token: pending visitor (cookie + session)", True, "/", "", pending),
    ]


def _start_response(status: str, headers: Any, exc_info: Any = None) -> None:
    return None


def environ_for(kind: Kind) -> dict[str, Any]:
    headers = {"Cookie": kind.cookie} if kind.cookie else {}
    return EnvironBuilder(path=kind.path, query_string=kind.query, headers=headers).get_environ()


def serve(app: Flask, environ: dict[str, Any], n: int) -> None:
    """``n`` WSGI calls of ``app`` with a fresh copy of ``environ``, bodies consumed."""
    for _ in range(n):
        body = app(dict(environ), _start_response)
        try:
            for _chunk in body:
                pass
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()


def wsgi_loop(app: Flask, kind: Kind, n: int) -> Callable[[], float]:
    environ = environ_for(kind)

    def run() -> float:
        gc.collect()
        started = time.thread_time()
        serve(app, environ, n)
        return (time.thread_time() - started) / n * 1e6

    return run


def in_process(result: Result, quick: bool, workdir: str) -> None:
    rounds, n = (3, 200) if quick else (31, 1000)
    plain = plain_portal()
    mmolove = MMOLove()
    ext = referral_portal(
        {
            "MMOLOVE_SERVER_ID": "bench",
            "MMOLOVE_REFERRAL_SECRET": "bench-secret",
            "MMOLOVE_ENDPOINT": "http://127.0.0.1:9/api/referral/events",
            "MMOLOVE_DATABASE_URI": sqlite_url(workdir, "overhead.sqlite3"),
        },
        mmolove,
    )
    table = result.table(
        f"In process: µs per request, WSGI call (medians of {rounds} interleaved rounds "
        f"of {n} requests; ratio: median of the per-round ratios, with its 95% interval)",
        ["request", "without", "with flask-mmolove", "extra µs", "ratio", "95% interval"],
    )
    rows = []
    for kind in request_kinds(plain):
        cases = {"plain": wsgi_loop(plain, kind, n), "ext": wsgi_loop(ext, kind, n)}
        for case in cases.values():  # warm-up: first requests, thread start, caches
            case()
        samples = interleaved(cases, rounds)
        rows.append(_row(kind, samples["plain"], samples["ext"]))
    # An A/A control: the plain portal against a copy of itself. Its interval should
    # hold 1; when it does not, something other than noise (the order of the cases, the
    # placement in memory) favours one side, and no timed verdict is given.
    bare = request_kinds(plain)[0]
    cases = {"plain": wsgi_loop(plain, bare, n), "twin": wsgi_loop(plain_portal(), bare, n)}
    for case in cases.values():
        case()
    samples = interleaved(cases, rounds)
    control = _row(Kind("control", CONTROL_LABEL, False, "/"), samples["plain"], samples["twin"])
    table.add(*_cells(control))
    _report(result, table, rows, "inprocess", "_us", "CPU time", control)
    mmolove.shutdown(ext)


@dataclass(frozen=True)
class Row:
    kind: Kind
    #: Without and with flask-mmolove, in the table's unit.
    base: float
    cand: float
    #: Cost with over cost without.
    ratio: float
    #: The ratio's 95% interval; None for a count, which is exact.
    interval: tuple[float, float] | None = None


def _row(kind: Kind, base: list[float], cand: list[float], *, inverse: bool = False) -> Row:
    """A timed row from per-round samples; ``inverse`` for rates (cost = 1 / rate)."""
    ratios = paired_ratios(base, cand) if inverse else paired_ratios(cand, base)
    return Row(
        kind,
        median(base),
        median(cand),
        median(ratios),
        median_interval(ratios),
    )


def _cells(row: Row) -> list[Cell]:
    cells: list[Cell] = [row.kind.label, row.base, row.cand, row.cand - row.base, row.ratio]
    if row.interval is not None:
        cells.append(f"[{row.interval[0]:.3f}, {row.interval[1]:.3f}]")
    return cells


def _report(
    result: Result,
    table: Table,
    rows: list[Row],
    prefix: str,
    unit: str,
    measure: str,
    control: Row | None = None,
) -> None:
    """The rows, their metrics, and the goal on the requests without a token."""
    for row in rows:
        table.add(*_cells(row))
        key = f"{prefix}.{row.kind.key}"
        result.metric(f"{key}.plain{unit}", row.base)
        result.metric(f"{key}.ext{unit}", row.cand)
        result.metric(f"{key}.ratio", row.ratio)
        if row.interval is not None:
            result.metric(f"{key}.ratio_low", row.interval[0])
            result.metric(f"{key}.ratio_high", row.interval[1])
    no_token = [row for row in rows if not row.kind.token]
    result.metric(f"{prefix}.no_token_worst.ratio", max(row.ratio for row in no_token))
    if control is not None:
        result.metric(f"{prefix}.control.ratio", control.ratio)
    _judge(result, f"in process, under 5% without a token ({measure})", no_token, control)


CONTROL_LABEL = "control: no token, the plain portal against a copy of itself"


def _judge(result: Result, text: str, no_token: list[Row], control: Row | None) -> None:
    """The goal (every request without a token under 5%), from exact counts or from
    timed ratios with their 95% intervals.

    Timed: met when every interval lies under 1.05, not met when one lies wholly above,
    otherwise not decided; also not decided when the A/A control's interval misses 1.
    """
    worst = max(no_token, key=lambda row: row.ratio)
    detail = f"worst no-token ratio {worst.ratio:.3f}"
    if worst.interval is None:
        result.goal(text, worst.ratio < GOAL, detail)
        return
    highest = max(no_token, key=lambda row: row.interval[1] if row.interval else 0.0)
    assert highest.interval is not None
    detail += f" [{worst.interval[0]:.3f}, {worst.interval[1]:.3f}]"
    met: bool | None
    if any(row.interval is not None and row.interval[0] >= GOAL for row in no_token):
        met = False
    elif highest.interval[1] < GOAL:
        met = True
    else:
        met = None
        detail += (
            f"; not decided: the 95% interval of '{highest.kind.label}' reaches "
            f"{highest.interval[1]:.3f}"
        )
    if control is not None and control.interval is not None:
        low, high = control.interval
        detail += f"; A/A control {control.ratio:.3f} [{low:.3f}, {high:.3f}]"
        if met is not None and not low <= 1 <= high:
            met = None
            detail += ": not decided, the control's interval misses 1"
    result.goal(text, met, detail)


_TOTALS = re.compile(r"^totals:\s+(\d+)", re.MULTILINE)


def _count(valgrind: str, portal: str, workdir: str, n1: int, n2: int, keys: list[str]) -> Any:
    """Start ``bench.count_proc`` under callgrind; returns the process and its dump folder."""
    out = Path(workdir) / f"callgrind-{portal}"
    out.mkdir()
    args = [
        valgrind,
        "--tool=callgrind",
        "--dump-before=getppid",
        f"--callgrind-out-file={out}/callgrind.out.%p",
        sys.executable,
        "-m",
        "bench.count_proc",
        portal,
        sqlite_url(workdir, f"count-{portal}.sqlite3"),
        str(n1),
        str(n2),
        *keys,
    ]
    # A fixed hash seed: the same dict layouts, so the same instructions, run after run.
    env = python_env(PYTHONHASHSEED="0")
    process = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return process, out


def _phases(process: Any, out: Path) -> dict[str, int]:
    """Instructions counted in each phase the child printed, by phase label."""
    stdout, stderr = process.communicate(timeout=1800)
    if process.returncode != 0:
        raise RuntimeError(f"the callgrind run failed ({process.returncode}): {stderr[-2000:]}")
    labels = json.loads(stdout.strip().splitlines()[-1])
    # callgrind.out.<pid>.<k>: the k-th dump, at the k-th boundary.
    dumps = sorted(
        (int(path.name.rsplit(".", 1)[1]), path)
        for path in out.glob("callgrind.out.*.*")
        if path.name.rsplit(".", 1)[1].isdigit()
    )
    if len(dumps) < len(labels):
        raise RuntimeError(f"expected {len(labels)} callgrind dumps, found {len(dumps)} in {out}")
    counts = {}
    for label, (_, path) in zip(labels, dumps, strict=False):
        match = _TOTALS.search(path.read_text())
        if match is None:
            raise RuntimeError(f"no totals line in {path}")
        counts[label] = int(match.group(1))
    return counts


def instructions(result: Result, quick: bool, workdir: str) -> None:
    """Instructions per request, counted by callgrind in the same request loop.

    Unlike time, a count does not move with what else the machine (or its host) is
    doing: the same code gives the same figure, run after run.
    """
    valgrind = which("valgrind")
    if valgrind is None:
        result.notes.append("instruction counts skipped: valgrind is not installed")
        result.goal("in process, under 5% without a token (instructions)", None, "no valgrind")
        return
    n1, n2 = (20, 120) if quick else (200, 1200)
    kinds = request_kinds(plain_portal())
    if quick:
        kinds = [kind for kind in kinds if kind.key in ("bare", "landing")]
    keys = [kind.key for kind in kinds]
    # Both portals at once, one per core; each count is exact whatever runs beside it.
    runs = {portal: _count(valgrind, portal, workdir, n1, n2, keys) for portal in PORTALS}
    counts = {portal: _phases(*run) for portal, run in runs.items()}
    table = result.table(
        f"In process: instructions per request, counted by callgrind (the difference of "
        f"{n2} and {n1} requests, over {n2 - n1})",
        ["request", "without", "with flask-mmolove", "extra", "ratio"],
    )
    rows = []
    for kind in kinds:
        per_request = {
            portal: (counts[portal][f"n2:{kind.key}"] - counts[portal][f"n1:{kind.key}"])
            / (n2 - n1)
            for portal in PORTALS
        }
        base, cand = per_request["plain"], per_request["referral"]
        rows.append(Row(kind, base, cand, cand / base))
    _report(result, table, rows, "instructions", "", "instructions")


_RPS = re.compile(r"Requests/sec:\s+([0-9.]+)")
_P50 = re.compile(r"^\s*50%\s+([0-9.]+)(us|ms|s)\s*$", re.MULTILINE)
_ERRORS = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors:.*")


def run_wrk(wrk: str, url: str, cookie: str, seconds: float) -> tuple[float, float]:
    """Requests per second and median latency (ms) of one wrk run."""
    args = [wrk, "-t1", "-c4", f"-d{max(1, round(seconds))}s", "--latency"]
    if cookie:
        args += ["-H", f"Cookie: {cookie}"]
    out = subprocess.run(
        pinned([*args, url], 1), capture_output=True, text=True, check=True, timeout=120
    ).stdout
    rps, p50 = _RPS.search(out), _P50.search(out)
    if rps is None or p50 is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    errors = _ERRORS.search(out)
    if errors is not None or _SOCKET_ERRORS.search(out):
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p50.group(2)]
    return float(rps.group(1)), float(p50.group(1)) * scale


def gunicorn(portal: str, port: int, workdir: str) -> Child:
    env = python_env(
        BENCH_PORTAL=portal,
        BENCH_DATABASE_URI=sqlite_url(workdir, "gunicorn.sqlite3"),
    )
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "--workers=1",
        f"--bind=127.0.0.1:{port}",
        "--log-level=warning",
        "--chdir",
        str(ROOT),
        "bench.wsgi:app",
    ]
    child = Child(pinned(args, 0), env, terminate=True)
    wait_for_port(port)
    return child


def under_gunicorn(result: Result, quick: bool, workdir: str) -> None:
    wrk = which("wrk")
    try:
        import gunicorn as _gunicorn
    except ImportError:
        _gunicorn = None
    if wrk is None or _gunicorn is None:
        missing = " and ".join(
            name for name, have in (("wrk", wrk), ("gunicorn", _gunicorn)) if have is None
        )
        result.notes.append(f"gunicorn + wrk part skipped: {missing} not installed")
        result.goal("under gunicorn + wrk, under 5% without a token", None, f"no {missing}")
        return
    rounds, seconds = (1, 1.0) if quick else (15, 1.0)
    ports = {"plain": free_port(), "referral": free_port(), "twin": free_port()}
    servers = [
        gunicorn("plain" if portal == "twin" else portal, port, workdir)
        for portal, port in ports.items()
    ]
    table = result.table(
        f"gunicorn (1 sync worker, core 0) + wrk (-t1 -c4, core 1): requests/s and median "
        f"latency ({rounds} interleaved rounds of {seconds:g} s; ratio: median of the "
        "per-round ratios, with its 95% interval)",
        [
            "request",
            "req/s without",
            "req/s with",
            "p50 ms without",
            "p50 ms with",
            "ratio",
            "95% interval",
        ],
    )
    plain_app = plain_portal()
    kinds = [k for k in request_kinds(plain_app) if k.key in ("bare", "landing", "pending")]
    bare: Row | None = None
    control: Row | None = None
    with children(servers):
        for kind in kinds:
            path = kind.path + (f"?{kind.query}" if kind.query else "")
            # The A/A control (the plain portal on a second server) with the bare kind.
            portals = [p for p in ports if p != "twin" or kind.key == "bare"]
            runs: dict[str, list[tuple[float, float]]] = {p: [] for p in portals}

            def case(
                portal: str,
                kind: Kind = kind,
                path: str = path,
                runs: dict[str, list[tuple[float, float]]] = runs,
            ) -> Callable[[], float]:
                def run() -> float:
                    url = f"http://127.0.0.1:{ports[portal]}{path}"
                    rps, p50 = run_wrk(wrk, url, kind.cookie, seconds)
                    runs[portal].append((rps, p50))
                    return rps

                return run

            for portal in portals:  # warm-up
                run_wrk(wrk, f"http://127.0.0.1:{ports[portal]}{path}", kind.cookie, 1)
            samples = interleaved({p: case(p) for p in portals}, rounds)
            p50s = {p: median([r[1] for r in runs[p]]) for p in portals}
            # Time per request is 1/rate: the ratio of costs is plain rate over ours.
            row = _row(kind, samples["plain"], samples["referral"], inverse=True)
            label, *rates, ratio, interval = _cells(row)
            table.add(label, *rates[:2], p50s["plain"], p50s["referral"], ratio, interval)
            result.metric(f"gunicorn.{kind.key}.plain_per_s", row.base)
            result.metric(f"gunicorn.{kind.key}.ext_per_s", row.cand)
            result.metric(f"gunicorn.{kind.key}.ratio", row.ratio)
            if kind.key == "bare":
                bare = row
                twin = Kind("control", CONTROL_LABEL, False, kind.path)
                control = _row(twin, samples["plain"], samples["twin"], inverse=True)
                label, *rates, ratio, interval = _cells(control)
                table.add(label, *rates[:2], p50s["plain"], p50s["twin"], ratio, interval)
                result.metric("gunicorn.control.ratio", control.ratio)
    assert bare is not None
    _judge(result, "under gunicorn + wrk, under 5% without a token", [bare], control)


def run(quick: bool) -> Result:
    result = Result(NAME, TITLE, quick)
    result.notes.append(
        "ratio = time per request with flask-mmolove over without (median of per-round "
        "ratios); under gunicorn the time per request is 1 / requests per second."
    )
    with tempfile.TemporaryDirectory(prefix="mmolove-bench-") as workdir:
        instructions(result, quick, workdir)
        in_process(result, quick, workdir)
        under_gunicorn(result, quick, workdir)
    return result
