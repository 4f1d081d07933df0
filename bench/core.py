"""Shared plumbing for the benchmarks: results, timing, helper processes, databases.

Every benchmark returns a :class:`Result`: tables for people, flat ``metrics`` for
machines (units in the name: ``_us``, ``_ms``, ``_per_s``, ``_mb``, ``_ratio``), the
goals the issue set and whether this run met them. Timing is interleaved (baseline and
candidate alternate, round after round) and summarised by medians, so drift of the
machine (another process, frequency scaling) falls on both sides alike.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import queue
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_VERSION = 1
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/mmolove_test"

Cell = str | int | float | None


# --- results ----------------------------------------------------------------------


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)

    def add(self, *cells: Cell) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))


@dataclass
class Goal:
    text: str
    #: None when this run could not measure it (a tool or database was missing).
    met: bool | None
    detail: str


@dataclass
class Result:
    name: str
    title: str
    quick: bool
    params: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self, title: str, columns: Sequence[str]) -> Table:
        made = Table(title, list(columns))
        self.tables.append(made)
        return made

    def metric(self, key: str, value: float) -> float:
        self.metrics[key] = float(value)
        return value

    def goal(self, text: str, met: bool | None, detail: str) -> None:
        self.goals.append(Goal(text, met, detail))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema"] = SCHEMA_VERSION
        return data


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


# --- statistics -------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1), linear between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def paired_ratios(candidate: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Each round's candidate over that round's baseline."""
    return [c / b for c, b in zip(candidate, baseline, strict=True)]


def paired_ratio(candidate: Sequence[float], baseline: Sequence[float]) -> float:
    """The median of per-round ratios: each round's candidate over that round's baseline."""
    return median(paired_ratios(candidate, baseline))


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median: two order statistics of ``values``.

    With n values, [x(k), x(n-k+1)] holds the true median with probability
    1 - 2 P(Binomial(n, 1/2) < k), whatever the distribution: noise on a shared VM is
    skewed and has outliers, so no normal approximation. The largest k that keeps
    ``confidence`` is used; too few values for it give the whole range (n = 5: 94%).
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no values")
    best, below = 1, 0.0
    for k in range(1, (n + 1) // 2 + 1):
        below += math.comb(n, k - 1) / 2**n  # P(Binomial(n, 1/2) < k)
        if 1 - 2 * below < confidence:
            break
        best = k
    return ordered[best - 1], ordered[n - best]


def interleaved(cases: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every case once per round, alternating the order (ABC, CBA, ...).

    Each case returns one measurement; the result maps case -> one value per round.
    """
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for n in range(rounds):
        for name in names if n % 2 == 0 else reversed(names):
            samples[name].append(cases[name]())
    return samples


def per_call(func: Callable[[], object], n: int) -> float:
    """Seconds per call of ``func``, over ``n`` calls."""
    started = time.perf_counter()
    for _ in range(n):
        func()
    return (time.perf_counter() - started) / n


# --- processes ----------------------------------------------------------------------


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process in MiB (Linux)."""
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/<pid>/status")


def cpu_seconds(pid: int | None = None) -> float:
    """User plus system CPU time of a process so far (Linux)."""
    stat = Path(f"/proc/{pid or 'self'}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += process_tree(int(child))
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def python_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class Child:
    """A helper process that speaks JSON lines on stdout; stopped when stdin closes.

    ``terminate``: the process does not read stdin (a server such as gunicorn) and is
    stopped with SIGTERM instead.
    """

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        terminate: bool = False,
    ) -> None:
        self.terminate = terminate
        self.proc = subprocess.Popen(
            list(args),
            cwd=ROOT,
            env=dict(env or python_env()),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    @classmethod
    def module(cls, module: str, *args: str, env: Mapping[str, str] | None = None) -> Child:
        return cls([sys.executable, "-m", module, *args], env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def read(self, timeout: float = 60.0) -> dict[str, Any]:
        """The next JSON object the child printed."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{self.proc.args!r} said nothing for {timeout} s") from None
            if line is None:
                raise RuntimeError(f"{self.proc.args!r} exited with {self.proc.wait()}")
            line = line.strip()
            if line.startswith("{"):
                data: dict[str, Any] = json.loads(line)
                return data

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 10.0) -> None:
        if self.terminate and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def children(items: Sequence[Child]) -> Iterator[Sequence[Child]]:
    try:
        yield items
    finally:
        for child in items:
            child.stop()


def which(tool: str) -> str | None:
    return shutil.which(tool)


def pinned(args: Sequence[str], cpu: int) -> list[str]:
    """``args`` pinned to one CPU with taskset, when there are two or more and taskset."""
    taskset = which("taskset")
    if taskset is None or (os.cpu_count() or 1) < 2:
        return list(args)
    return [taskset, "-c", str(cpu), *args]


# --- the sandbox in its own process ---------------------------------------------------


def have_gunicorn() -> bool:
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        return False
    return True


class Sandbox:
    """``bench.sandbox_proc``: the MMOLove sandbox in its own process, with a set latency.

    ``keep_alive``: served by gunicorn (one gthread worker, 32 threads), which keeps
    connections open between requests, as MMOLove's front end does; otherwise by
    werkzeug's threaded server (the sandbox's own), which closes every connection.
    Either way the process keeps to one CPU (``sandbox_proc.keep_to_one_cpu``), as a
    remote MMOLove would take none of the senders' cores: its CPU figure is at most
    one core.
    """

    def __init__(self, delay: float = 0.0, *, keep_alive: bool = False) -> None:
        self.secret = secrets.token_urlsafe(32)
        self.server_id = f"bench-{secrets.token_hex(3)}"
        env = python_env(
            BENCH_SANDBOX_SECRET=self.secret,
            BENCH_SANDBOX_SERVER_ID=self.server_id,
            BENCH_SANDBOX_DELAY=str(delay),
        )
        self.keep_alive = keep_alive
        if keep_alive:
            self.port = free_port()
            args = [
                sys.executable,
                "-m",
                "gunicorn",
                "--worker-class=gthread",
                "--workers=1",
                "--threads=32",
                "--keep-alive=30",
                "--backlog=256",
                f"--bind=127.0.0.1:{self.port}",
                "--log-level=warning",
                "--chdir",
                str(ROOT),
                "bench.sandbox_proc:app",
            ]
            self.child = Child(args, env, terminate=True)
            wait_for_port(self.port, timeout=30)
        else:
            args = [sys.executable, "-m", "bench.sandbox_proc", "--delay", str(delay)]
            self.child = Child(args, env)
            self.port = int(self.child.read(timeout=30)["port"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.endpoint = f"{self.url}/api/referral/events"
        from flask_mmolove.sandbox.tokens import TokenMinter, derive_token_key

        self._minter = TokenMinter(derive_token_key(self.secret))

    @property
    def pid(self) -> int:
        return self.child.pid

    def cpu_seconds(self) -> float:
        """CPU time of the sandbox's processes so far (gunicorn's worker included)."""
        return sum(cpu_seconds(pid) for pid in process_tree(self.child.pid))

    def mint(self, code: str = "friend") -> str:
        """A token as the sandbox mints for a click on ``code``'s share link."""
        return self._minter.mint(self.server_id, code)

    def _call(self, method: str, path: str) -> dict[str, Any]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path)
            data: dict[str, Any] = json.loads(conn.getresponse().read())
            return data
        finally:
            conn.close()

    def set_delay(self, seconds: float) -> None:
        self._call("POST", f"/_bench/delay?seconds={seconds}")

    def stats(self) -> dict[str, Any]:
        """``accepted`` (events written), ``answers`` (status -> count) and ``requests``."""
        return self._call("GET", "/_bench/stats")

    def reset(self) -> None:
        self._call("POST", "/_reset")

    def portal_config(self) -> dict[str, Any]:
        return {
            "MMOLOVE_SERVER_ID": self.server_id,
            "MMOLOVE_REFERRAL_SECRET": self.secret,
            "MMOLOVE_ENDPOINT": self.endpoint,
        }

    def close(self) -> None:
        self.child.stop()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- databases ----------------------------------------------------------------------


def postgres_url() -> str | None:
    """The PostgreSQL URL to benchmark on, or None when none answers."""
    url = (
        os.environ.get("MMOLOVE_BENCH_POSTGRES_URL")
        or os.environ.get("MMOLOVE_TEST_POSTGRES_URL")
        or DEFAULT_POSTGRES_URL
    )
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("select 1"))
        finally:
            engine.dispose()
    except Exception:
        return None
    return url


def table_prefix() -> str:
    """A table prefix no other run (or test) uses at the same time."""
    return f"bench{os.getpid()}_{secrets.token_hex(3)}_"


def sqlite_url(directory: Path | str, name: str = "outbox.sqlite3") -> str:
    return f"sqlite:///{Path(directory) / name}"
