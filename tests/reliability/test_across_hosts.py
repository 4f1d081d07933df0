"""Workers on three hosts against one PostgreSQL, with real separation (issue 15,
proofs 3 and 8): each host is a network namespace on a veth pair (tests/netns.py),
reaching PostgreSQL through a relay of its own on the bridge, and MMOLove (the sandbox)
on the bridge's address. The portal keeps the outbox in its own transaction (``db=``),
so a grant made in ``referrer_credited`` is exactly once by contract.

Host 1, whose clock is 90 s behind, starts alone and claims a batch; MMOLove holds each
answer a second, so its pass outlives a lease and it must renew. Host 2's clock is 90 s
ahead, host 3's true (tests/native/wallclock_shift.c): each more than a lease apart.
Leased by each host's own clock, host 1's live claims would look long run out to the
others. In the middle of the pass host 1 is cut off for longer than the lease: its
claims run out, and the other two take over. When host 1 is back, what it still held
in hand is refused, and it sends nothing it no longer holds.

Two ways of being cut off: its cable pulled (nothing gets through), and its path to
the database alone cut at the router (MMOLove still answers it: a holder that cannot
renew must stop starting sends its lease may not outlast). Either way nothing is lost,
nothing is credited twice, and MMOLove never has two POSTs of one event in hand at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from netns import Host, Network, Relay, unavailable
from reliability_support import (
    HERE,
    assert_exactly_once,
    concurrent_posts,
    enqueue_pairs,
    open_outbox,
    record_figures,
    skewed,
    stop_process,
    wallclock_shift,
)
from support import missing

from flask_mmolove.outbox import Outbox
from flask_mmolove.sandbox import SandboxServer

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(300)]

REFEREES = 30
#: Short, so a proof takes a minute: an attempt's deadline (connect + read) fits well
#: inside the lease, as init_app insists.
LEASE, CONNECT, READ = 8.0, 1.0, 3.0
#: Host 1's batch, sent two at a time, takes longer than the lease to send.
BATCH, CONCURRENCY = 20, 2
#: MMOLove holds every answer this long.
MMOLOVE_SECONDS = 1.0
#: Host 1 is cut off longer than a lease: its claims run out while it is away.
CUT_SECONDS = LEASE + 6.0
#: Each host's clock against the machine's: more than a lease apart.
SKEWS = {"h1": -90.0, "h2": 90.0, "h3": 0.0}
#: Everything delivered and credited within this many seconds of host 1's return.
SETTLE_BOUND = 120.0


@pytest.fixture
def network() -> Iterator[Network]:
    reason = unavailable() or (None if wallclock_shift() else "no C compiler to shift clocks")
    if reason:
        missing(reason)
    net = Network()
    try:
        yield net
    finally:
        net.close()


def _host_env(sandbox: SandboxServer, database_uri: str) -> dict[str, str]:
    portal = {
        "SQLALCHEMY_DATABASE_URI": database_uri,
        "MMOLOVE_DELIVERY": "worker",
        "MMOLOVE_LEASE": LEASE,
        "MMOLOVE_CONNECT_TIMEOUT": CONNECT,
        "MMOLOVE_READ_TIMEOUT": READ,
        "MMOLOVE_BATCH_SIZE": BATCH,
        "MMOLOVE_CONCURRENCY": CONCURRENCY,
        "MMOLOVE_POLL_INTERVAL": 0.5,
        "MMOLOVE_RETRY_BASE": 0.2,
        "MMOLOVE_RETRY_CAP": 1.0,
    }
    return {
        **os.environ,
        "FLASK_APP": str(HERE / "dbportal.py"),
        "MMOLOVE_ENDPOINT": sandbox.endpoint,
        "MMOLOVE_SERVER_ID": sandbox.server_id,
        "MMOLOVE_REFERRAL_SECRET": sandbox.secret,
        "PYTHONUNBUFFERED": "1",
        **{f"PORTAL_{key}": json.dumps(value) for key, value in portal.items()},
    }


def _wait(predicate: Callable[[], bool], timeout: float) -> float | None:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started >= timeout:
            return None
        time.sleep(0.25)
    return time.monotonic() - started


def _scalar(engine: sa.Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar_one()


class Hosts:
    """Three hosts, each with its relay to PostgreSQL, MMOLove on the bridge, and the
    portal's database made ready with ``REFEREES`` referees' events waiting."""

    def __init__(self, network: Network, database_uri: str, tmp_path: Path) -> None:
        self.network = network
        self.tmp_path = tmp_path
        self.hosts = {name: network.add_host(name) for name in SKEWS}
        self.names = {host.address: name for name, host in self.hosts.items()}
        port = sa.make_url(database_uri).port or 5432
        self.relays = {name: Relay(network.address, ("127.0.0.1", port)) for name in SKEWS}
        self.database_uri = database_uri
        self.engine = sa.create_engine(database_uri)
        self.sandbox = SandboxServer(host=network.address).start()
        self.workers: dict[str, subprocess.Popen[str]] = {}
        self.outputs: dict[str, str] = {}
        # The outbox at its schema's head first; then the portal's own tables.
        self.outbox = open_outbox(database_uri)
        created = subprocess.run(
            [sys.executable, str(HERE / "dbportal.py"), "create"],
            env=_host_env(self.sandbox, database_uri),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stderr
        # Written as by a portal on host 1 (behind): due on every host at once.
        writer = Outbox(self.outbox.engine, clock=lambda: time.time() + SKEWS["h1"])
        self.pairs = enqueue_pairs(writer, self.sandbox, REFEREES, prefix="h")
        self.sandbox.delay_next(100 * REFEREES, MMOLOVE_SECONDS)

    def start(self, name: str) -> None:
        """A real ``flask mmolove worker`` on host ``name``, on its clock, through its
        relay."""
        host: Host = self.hosts[name]
        relayed = (
            sa.make_url(self.database_uri)
            .set(host=self.network.address, port=self.relays[name].port)
            .render_as_string(hide_password=False)
        )
        env = _host_env(self.sandbox, relayed)
        self.workers[name] = subprocess.Popen(
            host.command(sys.executable, "-m", "flask", "mmolove", "worker"),
            env=skewed(env, SKEWS[name]) if SKEWS[name] else env,
            cwd=self.tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def posts_from(self, name: str) -> int:
        return sum(1 for r in self.sandbox.events if self.names.get(r.peer or "") == name)

    def leases_of(self, name: str) -> tuple[int, float | None, float | None]:
        """How many events host ``name`` holds, when the last of its leases ends (the
        database's clock, which is this machine's), and when it last claimed one (by
        its own clock)."""
        with self.engine.connect() as conn:
            held, until, attempted = conn.execute(
                sa.text(
                    "SELECT count(*), max(lease_until), max(last_attempt_at) "
                    "FROM mmolove_events WHERE lease_owner LIKE :owner"
                ),
                {"owner": f"%:{self.workers[name].pid}:%"},
            ).one()
        return (
            int(held),
            None if until is None else float(until),
            None if attempted is None else float(attempted),
        )

    def answered_after(self, name: str, deadline: float, before: float) -> list[Any]:
        """Host ``name``'s POSTs that arrived before ``before`` and were still in
        MMOLove's hands at ``deadline``."""
        return [
            r
            for r in self.sandbox.events
            if self.names.get(r.peer or "") == name
            and (r.received or r.time) < before
            and r.time > deadline
        ]

    def settled(self) -> bool:
        stats = self.outbox.stats()
        return (
            self.sandbox.accepted_count("registered") == REFEREES
            and self.sandbox.accepted_count("qualified") == REFEREES
            and stats.delivered == 2 * REFEREES
            and stats.credits_unnotified == 0
            and _scalar(self.engine, "SELECT count(DISTINCT referee) FROM grants") == REFEREES
        )

    def grants(self) -> Counter[str]:
        with self.engine.connect() as conn:
            return Counter(conn.scalars(sa.text("SELECT referee FROM grants")))

    def stop(self) -> None:
        for name, worker in self.workers.items():
            self.outputs[name] = stop_process(worker)

    def close(self) -> None:
        for worker in self.workers.values():
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        for relay in self.relays.values():
            relay.close()
        self.sandbox.stop()
        self.outbox.dispose()
        self.engine.dispose()


def _run(
    network: Network, database_uri: str, tmp_path: Path, name: str, *, cut: str
) -> dict[str, Any]:
    """Host 1 alone, then all three; host 1 cut off mid-pass (``cut``: "cable" or
    "database") for CUT_SECONDS; everything checked once it has settled."""
    hosts = Hosts(network, database_uri, tmp_path)
    try:
        hosts.start("h1")
        # Host 1 is in the middle of its pass: an answer is in, more are due.
        assert _wait(lambda: hosts.posts_from("h1") >= 1, 60) is not None, "host 1 sent nothing"
        hosts.start("h2")
        hosts.start("h3")
        h1_host, h1_relay = hosts.hosts["h1"], hosts.relays["h1"]
        if cut == "cable":
            network.cut(h1_host)
        else:
            h1_relay.cut()
        cut_at = time.monotonic()
        posts_before_cut = hosts.posts_from("h1")
        # What host 1 holds now is all it will hold until it is back: a renewal it
        # sends from now on is held at the cut (whatever reached the database before
        # is committed by the time this reads).
        time.sleep(0.5)
        held, lease_end, claimed_at = hosts.leases_of("h1")
        # Host 1's clock is the shifted one (else this proves nothing about skew).
        assert claimed_at is not None
        assert abs(claimed_at - (time.time() + SKEWS["h1"])) < 30
        time.sleep(CUT_SECONDS - 0.5)
        restored_wall = time.time()
        if cut == "cable":
            network.restore(h1_host)
        else:
            h1_relay.restore()
        restored_at = time.monotonic()
        seconds = _wait(hosts.settled, SETTLE_BOUND)
        # Host 1 is back and has finished what it held; a late POST would come now.
        time.sleep(LEASE / 2)
        hosts.stop()
        grants = hosts.grants()
        stats = hosts.outbox.stats()
        overlapping = concurrent_posts(hosts.sandbox)
        per_host = {name: hosts.posts_from(name) for name in SKEWS}
        assert lease_end is not None
        outlived = hosts.answered_after("h1", lease_end, restored_wall)
        twice = sorted(referee for referee, n in grants.items() if n > 1)
        record_figures(
            name,
            referees=REFEREES,
            lease_s=LEASE,
            cut_s=CUT_SECONDS,
            held_by_h1_at_cut=held,
            h1_posts_before_cut=posts_before_cut,
            h1_posts_while_cut=hosts.posts_from("h1") - posts_before_cut,
            posts_per_host=str(per_host),
            posts=len(hosts.sandbox.events),
            concurrent_posts=len(overlapping),
            h1_posts_outliving_its_lease=len(outlived),
            credited=len(grants),
            credited_twice=len(twice),
            seconds_after_restore=seconds,
            cut_to_settled=None if seconds is None else restored_at - cut_at + seconds,
        )
        assert seconds is not None, f"not settled within {SETTLE_BOUND} s of the return: {stats}"
        for worker_name, worker in hosts.workers.items():
            assert worker.returncode == 0, f"{worker_name}: {hosts.outputs[worker_name]}"
        # Cut off, host 1 had no POST in MMOLove's hands once its leases ran out: had
        # it, another host could be sending the same event.
        assert outlived == [], f"{len(outlived)} POSTs by host 1 outlived its lease"
        assert overlapping == [], f"{len(overlapping)} events posted twice at once"
        assert twice == [], f"{len(twice)} referees credited twice: {twice}"
        assert sorted(grants) == sorted(identity for identity, _ in hosts.pairs)
        assert_exactly_once(hosts.sandbox, hosts.pairs, ["registered", "qualified"])
        assert (stats.delivered, stats.pending, stats.in_flight, stats.dead) == (
            2 * REFEREES,
            0,
            0,
            0,
        )
        # Host 1 held claims when it was cut off, and the others took them over.
        assert held > 0
        assert per_host["h2"] + per_host["h3"] > 0
        # What host 1 still had in hand when it came back was refused.
        assert "lease lost" in hosts.outputs["h1"], hosts.outputs["h1"]
        return {"outputs": hosts.outputs, "per_host": per_host}
    finally:
        hosts.close()


def test_a_host_whose_cable_is_pulled_mid_pass(
    network: Network, pg_schema_uri: str, tmp_path: Path
) -> None:
    _run(network, pg_schema_uri, tmp_path, "15.8 cable pulled", cut="cable")


def test_a_host_cut_off_from_the_database_mid_pass(
    network: Network, pg_schema_uri: str, tmp_path: Path
) -> None:
    _run(network, pg_schema_uri, tmp_path, "15.8 database cut off", cut="database")


#: How long host 1 stays cut off with its claim's transaction open: a lock held
#: for most of a minute.
HOLD_SECONDS = 45.0


def test_a_host_cut_off_inside_its_claims_transaction(
    network: Network, pg_schema_uri: str, tmp_path: Path
) -> None:
    """Host 1's link to the database goes down right after its claim has picked (and
    locked) its batch, before the lease is written and committed. PostgreSQL holds
    those row locks for as long as the session lives, and claims pass over locked rows:
    the batch must not wait for host 1's return (or for TCP to give up, hours later)."""
    hosts = Hosts(network, pg_schema_uri, tmp_path)
    try:
        relay = hosts.relays["h1"]
        relay.cut_after(b"SKIP LOCKED")
        hosts.start("h1")
        assert relay.tripped.wait(60), "host 1 never claimed"
        cut_at = time.monotonic()
        hosts.start("h2")
        hosts.start("h3")
        seconds = _wait(hosts.settled, HOLD_SECONDS)
        held_at_the_end = time.monotonic() - cut_at
        time.sleep(max(0.0, HOLD_SECONDS - held_at_the_end))
        relay.restore()
        # Host 1 is back: whatever it still had in hand is refused.
        assert _wait(hosts.settled, SETTLE_BOUND) is not None
        time.sleep(LEASE / 2)
        hosts.stop()
        grants = hosts.grants()
        overlapping = concurrent_posts(hosts.sandbox)
        record_figures(
            "15.8 cut off inside a claim",
            referees=REFEREES,
            hold_s=HOLD_SECONDS,
            settled_while_cut_off_s=seconds,
            posts_per_host=str({name: hosts.posts_from(name) for name in SKEWS}),
            posts=len(hosts.sandbox.events),
            concurrent_posts=len(overlapping),
            credited=len(grants),
            credited_twice=sum(1 for n in grants.values() if n > 1),
        )
        assert seconds is not None, (
            f"the batch host 1 had picked waited for its return ({HOLD_SECONDS} s): "
            f"{hosts.outbox.stats()}"
        )
        for name, worker in hosts.workers.items():
            assert worker.returncode == 0, f"{name}: {hosts.outputs[name]}"
        assert overlapping == []
        assert set(grants.values()) == {1}
        assert sorted(grants) == sorted(identity for identity, _ in hosts.pairs)
        assert_exactly_once(hosts.sandbox, hosts.pairs, ["registered", "qualified"])
    finally:
        hosts.close()
