"""Leases hold while their holder works (issue 15): a pass that sends for longer than a
lease renews it, and a credit is announced under a lease of its own, so a second
deliverer never takes over live work: every event posted once, every credit announced
once. Real sandbox, two deliverers in threads on one SQLite outbox."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from flask import Flask
from reliability_support import enqueue_pairs, open_outbox, posts_per_key
from support import wait_for

from flask_mmolove import MMOLove, referrer_credited
from flask_mmolove.outbox import Ending

LEASE = 1.0


def _portals(make_portal: Callable[..., Flask], uri: str, **extra: Any) -> tuple[Flask, Flask]:
    config = {
        **extra,
        "MMOLOVE_DELIVERY": "worker",
        "MMOLOVE_DATABASE_URI": uri,
        "MMOLOVE_LEASE": LEASE,
        "MMOLOVE_CONNECT_TIMEOUT": 0.2,
        "MMOLOVE_READ_TIMEOUT": 0.7,
    }
    return make_portal(MMOLove(), **config), make_portal(MMOLove(), **config)


def _keep_claiming(app: Flask, until: Callable[[], bool]) -> threading.Thread:
    """A second deliverer that claims whatever it can, over and over, until ``until()``."""

    def run() -> None:
        deliverer = app.extensions["mmolove"].deliverer
        while not until():
            deliverer.run_once()
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_pass_that_sends_for_longer_than_its_lease_keeps_its_claim(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any, tmp_path: Any
) -> None:
    uri = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    outbox = open_outbox(uri)
    pairs = enqueue_pairs(outbox, mmolove_sandbox, 6, qualified=False)
    first, second = _portals(make_portal, uri, MMOLOVE_CONCURRENCY=1)
    # MMOLove takes half a second an answer; one send at a time: the pass takes three
    # leases' time.
    mmolove_sandbox.delay_next(6, 0.5)
    reports: list[Any] = []
    holder = threading.Thread(
        target=lambda: reports.append(first.extensions["mmolove"].deliverer.drain())
    )
    holder.start()
    # The rival starts once the first holds all six.
    wait_for(lambda: outbox.stats().in_flight == len(pairs), 10, "the first's claim")
    done = threading.Event()
    rival = _keep_claiming(second, done.is_set)
    try:
        holder.join(30)
    finally:
        done.set()
        rival.join(10)
    assert mmolove_sandbox.accepted_count("registered") == len(pairs)
    assert max(posts_per_key(mmolove_sandbox).values()) == 1
    assert reports[0].delivered == len(pairs)


def test_credits_are_announced_once_by_two_deliverers_with_slow_receivers(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any, tmp_path: Any
) -> None:
    uri = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    outbox = open_outbox(uri)
    pairs = enqueue_pairs(outbox, mmolove_sandbox, 5)
    # Delivered as a deliverer records them (registered, then qualified owing its
    # credit), with nobody announcing yet.
    while events := outbox.claim("recorder", limit=50, lease=60):
        outbox.settle(
            "recorder",
            [
                Ending.delivered(
                    e.id,
                    status=200,
                    response="{}",
                    outcome="advanced",
                    credit=e.event == "qualified",
                )
                for e in events
            ],
        )
    first, second = _portals(make_portal, uri)
    announced: Counter[str] = Counter()
    lock = threading.Lock()

    def slow_grant(sender: Flask, identity: str, **extra: Any) -> None:
        time.sleep(0.4)  # an RPC to the game server
        with lock:
            announced[identity] += 1

    for app in (first, second):
        referrer_credited.connect(slow_grant, sender=app, weak=False)
    try:
        deadline = time.monotonic() + 15

        def announce(app: Flask) -> None:
            # Each deliverer keeps at it, as a worker's passes do.
            while time.monotonic() < deadline and len(announced) < len(pairs):
                app.extensions["mmolove"].deliverer.notify_credits()
                time.sleep(0.05)

        threads = [threading.Thread(target=announce, args=(app,)) for app in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        for app in (first, second):
            referrer_credited.disconnect(slow_grant, sender=app)
    assert announced == Counter({identity: 1 for identity, _ in pairs})


def test_a_lease_barely_longer_than_an_attempt_still_delivers(
    make_portal: Callable[..., Flask], mmolove_sandbox: Any, tmp_path: Any
) -> None:
    # init_app accepts any lease longer than an attempt's deadline (connect + read).
    # Sends are bounded by the lease instead of refused for want of a whole deadline's
    # margin: with 3.04 s against 3 s, every event was handed back, pass after pass,
    # and nothing was ever sent.
    uri = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    outbox = open_outbox(uri)
    pairs = enqueue_pairs(outbox, mmolove_sandbox, 10, qualified=False)
    app = make_portal(
        MMOLove(),
        MMOLOVE_DELIVERY="worker",
        MMOLOVE_DATABASE_URI=uri,
        MMOLOVE_LEASE=3.04,
        MMOLOVE_CONNECT_TIMEOUT=1.0,
        MMOLOVE_READ_TIMEOUT=2.0,
    )
    deliverer = app.extensions["mmolove"].deliverer
    reports = [deliverer.run_once() for _ in range(3)]
    assert mmolove_sandbox.accepted_count("registered") == len(pairs)
    assert sum(report.delivered for report in reports) == len(pairs)
    assert sum(report.released for report in reports) == 0
    assert max(posts_per_key(mmolove_sandbox).values()) == 1
    outbox.dispose()
