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

from . import core
from .portals import plain_portal, referral_portal

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


def in_process(result: core.Result, quick: bool, workdir: str) -> None:
    rounds, n = (3, 200) if quick else (15, 2000)
    plain = plain_portal()
    mmolove = MMOLove()
    ext = referral_portal(
        {
            "MMOLOVE_SERVER_ID": "bench",
            "MMOLOVE_REFERRAL_SECRET": "bench-secret",
            "MMOLOVE_ENDPOINT": "http://127.0.0.1:9/api/referral/events",
            "MMOLOVE_DATABASE_URI": core.sqlite_url(workdir, "overhead.sqlite3"),
        },
        mmolove,
    )
    table = result.table(
        f"In process: µs per request, WSGI call (median of {rounds} interleaved rounds "
        f"of {n} requests)",
        ["request", "without", "with flask-mmolove", "extra µs", "ratio"],
    )
    rows = []
    for kind in request_kinds(plain):
        cases = {"plain": wsgi_loop(plain, kind, n), "ext": wsgi_loop(ext, kind, n)}
        for case in cases.values():  # warm-up: first requests, thread start, caches
            case()
        samples = core.interleaved(cases, rounds)
        base, cand = core.median(samples["plain"]), core.median(samples["ext"])
        rows.append((kind, base, cand, core.paired_ratio(samples["ext"], samples["plain"])))
    # An A/A control: the plain portal against a copy of itself. How far its ratio
    # strays from 1 is how far this run's timing noise alone moves a ratio.
    bare = request_kinds(plain)[0]
    cases = {"plain": wsgi_loop(plain, bare, n), "twin": wsgi_loop(plain_portal(), bare, n)}
    for case in cases.values():
        case()
    samples = core.interleaved(cases, rounds)
    control = core.paired_ratio(samples["twin"], samples["plain"])
    table.add(
        CONTROL_LABEL,
        core.median(samples["plain"]),
        core.median(samples["twin"]),
        core.median(samples["twin"]) - core.median(samples["plain"]),
        control,
    )
    _report(result, table, rows, "inprocess", "_us", "CPU time", control)
    mmolove.shutdown(ext)


def _report(
    result: core.Result,
    table: core.Table,
    rows: list[tuple[Kind, float, float, float]],
    prefix: str,
    unit: str,
    measure: str,
    control: float | None = None,
) -> None:
    """The rows (kind, without, with, ratio), their metrics, and the goal on the worst
    request without a token, read against the run's A/A ``control`` ratio if any."""
    worst_no_token = 0.0
    for kind, base, cand, ratio in rows:
        table.add(kind.label, base, cand, cand - base, ratio)
        result.metric(f"{prefix}.{kind.key}.plain{unit}", base)
        result.metric(f"{prefix}.{kind.key}.ext{unit}", cand)
        result.metric(f"{prefix}.{kind.key}.ratio", ratio)
        if not kind.token:
            worst_no_token = max(worst_no_token, ratio)
    result.metric(f"{prefix}.no_token_worst.ratio", worst_no_token)
    _judge(result, f"in process, under 5% without a token ({measure})", worst_no_token, control)
    if control is not None:
        result.metric(f"{prefix}.control.ratio", control)


CONTROL_LABEL = "control: no token, the plain portal against a copy of itself"


def _judge(result: core.Result, text: str, worst: float, control: float | None) -> None:
    """The goal, met when ``worst`` is under 5%; with a timed measure, undecided when
    the run's A/A control strayed as far from 1 as ``worst`` did."""
    met: bool | None = worst < GOAL
    detail = f"worst no-token ratio {worst:.3f}"
    if control is not None:
        detail += f"; A/A control {control:.3f}"
        if not met and abs(control - 1) >= worst - 1:
            met = None
            detail += ": undecided, timing noise alone moved the control as far"
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
        core.sqlite_url(workdir, f"count-{portal}.sqlite3"),
        str(n1),
        str(n2),
        *keys,
    ]
    # A fixed hash seed: the same dict layouts, so the same instructions, run after run.
    env = core.python_env(PYTHONHASHSEED="0")
    process = subprocess.Popen(
        args, cwd=core.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
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


def instructions(result: core.Result, quick: bool, workdir: str) -> None:
    """Instructions per request, counted by callgrind in the same request loop.

    Unlike time, a count does not move with what else the machine (or its host) is
    doing: the same code gives the same figure, run after run.
    """
    valgrind = core.which("valgrind")
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
        rows.append((kind, base, cand, cand / base))
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
        core.pinned([*args, url], 1), capture_output=True, text=True, check=True, timeout=120
    ).stdout
    rps, p50 = _RPS.search(out), _P50.search(out)
    if rps is None or p50 is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    errors = _ERRORS.search(out)
    if errors is not None or _SOCKET_ERRORS.search(out):
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p50.group(2)]
    return float(rps.group(1)), float(p50.group(1)) * scale


def gunicorn(portal: str, port: int, workdir: str) -> core.Child:
    env = core.python_env(
        BENCH_PORTAL=portal,
        BENCH_DATABASE_URI=core.sqlite_url(workdir, "gunicorn.sqlite3"),
    )
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "--workers=1",
        f"--bind=127.0.0.1:{port}",
        "--log-level=warning",
        "--chdir",
        str(core.ROOT),
        "bench.wsgi:app",
    ]
    child = core.Child(core.pinned(args, 0), env, terminate=True)
    core.wait_for_port(port)
    return child


def under_gunicorn(result: core.Result, quick: bool, workdir: str) -> None:
    wrk = core.which("wrk")
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
    rounds, seconds = (1, 1.0) if quick else (5, 3.0)
    ports = {"plain": core.free_port(), "referral": core.free_port(), "twin": core.free_port()}
    servers = [
        gunicorn("plain" if portal == "twin" else portal, port, workdir)
        for portal, port in ports.items()
    ]
    table = result.table(
        f"gunicorn (1 sync worker, core 0) + wrk (-t1 -c4, core 1): requests/s and median "
        f"latency ({rounds} interleaved rounds of {seconds:g} s)",
        ["request", "req/s without", "req/s with", "p50 ms without", "p50 ms with", "ratio"],
    )
    plain_app = plain_portal()
    kinds = [k for k in request_kinds(plain_app) if k.key in ("bare", "landing", "pending")]
    with core.children(servers):
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
            samples = core.interleaved({p: case(p) for p in portals}, rounds)
            # Time per request is 1/rate: the ratio of costs is plain rate over ours.
            ratio = core.paired_ratio(samples["plain"], samples["referral"])
            p50s = {p: core.median([r[1] for r in runs[p]]) for p in portals}
            rps = {p: core.median(samples[p]) for p in portals}
            table.add(
                kind.label, rps["plain"], rps["referral"], p50s["plain"], p50s["referral"], ratio
            )
            result.metric(f"gunicorn.{kind.key}.plain_per_s", rps["plain"])
            result.metric(f"gunicorn.{kind.key}.ext_per_s", rps["referral"])
            result.metric(f"gunicorn.{kind.key}.ratio", ratio)
            if "twin" in samples:
                control = core.paired_ratio(samples["plain"], samples["twin"])
                table.add(
                    CONTROL_LABEL, rps["plain"], rps["twin"], p50s["plain"], p50s["twin"], control
                )
                result.metric("gunicorn.control.ratio", control)
    _judge(
        result,
        "under gunicorn + wrk, under 5% without a token",
        result.metrics["gunicorn.bare.ratio"],
        result.metrics["gunicorn.control.ratio"],
    )


def run(quick: bool) -> core.Result:
    result = core.Result(NAME, TITLE, quick)
    result.notes.append(
        "ratio = time per request with flask-mmolove over without (median of per-round "
        "ratios); under gunicorn the time per request is 1 / requests per second."
    )
    with tempfile.TemporaryDirectory(prefix="mmolove-bench-") as workdir:
        instructions(result, quick, workdir)
        in_process(result, quick, workdir)
        under_gunicorn(result, quick, workdir)
    return result
