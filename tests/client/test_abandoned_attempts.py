"""Nothing of an attempt given up reaches MMOLove afterwards, over a real network path:
the client on a host of the test's own (a network namespace, tests/netns.py), MMOLove's
stand-in on the bridge, the host's cable pulled and put back.

A deliverer gives up an attempt at its deadline, which its lease outlasts; another host
may then send the same event. Were the request still to arrive later, MMOLove would
have it twice, perhaps at once: so the attempt's connection is reset, not closed
gracefully (a graceful close keeps retransmitting the request once the link is back),
and a deadline that passes while connecting sends nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from netns import Host, Network, unavailable
from support import missing

pytestmark = pytest.mark.slow

#: The client, run on the host: one step per line read from stdin, a line of JSON out.
CLIENT = """
import json, sys, time
from flask_mmolove.client import ReferralClient, TransportError

url = sys.argv[1]
clients = {}
for line in sys.stdin:
    step, n, budget, connect = json.loads(line)
    if step not in clients:
        clients[step] = ReferralClient("srv", "s" * 32, url, timeout=(connect, 1.0))
    client = clients[step]
    until = None if budget is None else time.monotonic() + budget
    try:
        client.send_body(json.dumps({"n": n}).encode(), until=until)
        print(json.dumps(None), flush=True)
    except TransportError as exc:
        print(json.dumps(str(exc)), flush=True)
"""


class Received(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    bodies: ClassVar[list[Any]] = []

    def do_POST(self) -> None:
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        answer = b'{"ok": true, "outcome": "recorded"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def setting(tmp_path: Path) -> Iterator[tuple[Network, Host, subprocess.Popen[str], list[Any]]]:
    reason = unavailable()
    if reason:
        missing(reason)
    network = Network()
    server: ThreadingHTTPServer | None = None
    client: subprocess.Popen[str] | None = None
    try:
        host = network.add_host("client")
        bodies: ClassVar[list[Any]] = []
        handler = type("Handler", (Received,), {"bodies": bodies})
        server = ThreadingHTTPServer((network.address, 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        script = tmp_path / "client.py"
        script.write_text(CLIENT)
        url = f"http://{network.address}:{server.server_port}/e"
        client = subprocess.Popen(
            host.command(sys.executable, str(script), url),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        yield network, host, client, bodies
    finally:
        if client is not None:
            client.kill()
            client.communicate()
        if server is not None:
            server.shutdown()
            server.server_close()
        network.close()


def _send(
    client: subprocess.Popen[str], step: str, n: int, budget: float | None, connect: float = 1.0
) -> Any:
    assert client.stdin is not None
    assert client.stdout is not None
    client.stdin.write(json.dumps([step, n, budget, connect]) + "\n")
    client.stdin.flush()
    return json.loads(client.stdout.readline())


def test_a_request_given_up_on_a_cut_link_never_arrives_once_it_is_back(
    setting: tuple[Network, Host, subprocess.Popen[str], list[Any]],
) -> None:
    network, host, client, bodies = setting
    assert _send(client, "kept-alive", 1, None) is None
    network.cut(host)
    # Sent on the kept-alive connection into the cut: given up (its read timeout).
    assert _send(client, "kept-alive", 2, None) is not None
    # Back once what the link itself had queued is gone, before TCP's next try.
    time.sleep(3.0)
    network.restore(host)
    # Past TCP's next retransmission of a connection closed gracefully.
    time.sleep(10.0)
    assert bodies == [{"n": 1}]


def test_a_deadline_passed_while_connecting_sends_nothing(
    setting: tuple[Network, Host, subprocess.Popen[str], list[Any]],
) -> None:
    network, host, client, bodies = setting
    assert _send(client, "warm-up", 1, None) is None  # the neighbours known
    network.cut(host)
    # Back in time for TCP's second try, well within the connect timeout: the
    # connection is made, but after the attempt's 0.3 s, which must then send nothing.
    threading.Timer(0.6, network.restore, args=(host,)).start()
    error = _send(client, "fresh", 2, 0.3, connect=5.0)
    assert error is not None
    time.sleep(2.0)
    assert bodies == [{"n": 1}]
