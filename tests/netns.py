"""Hosts of the test's own, for what crosses a network: each a Linux network namespace
on a veth pair, all on one bridge in this namespace, which plays the switch.

Needs root and iproute2 (``ip netns``). The hosts reach services of this machine that
listen on 127.0.0.1 only (PostgreSQL) through a :class:`Relay` on the bridge's address;
a service of the test's own (the sandbox) can listen on that address itself. Pulling a
host's cable is :meth:`Network.cut`: its port on the bridge goes down, so its packets
are lost as on a real link and its TCP connections stall rather than end.

The addresses come from 198.18.0.0/15, the block set aside for network tests
(RFC 2544): nothing outside these namespaces is ever a target.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import threading
import uuid
from dataclasses import dataclass, field

#: Each network's /24 is 198.18.N.0, N one no other network here uses (runs side by
#: side never share one); the bridge is .1, the hosts .11, .12, ...
PREFIX = "198.18"


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2's ip is missing: apt-get install iproute2"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Host:
    """One host: its namespace, its address, and its port on the bridge."""

    name: str
    namespace: str
    address: str
    port: str

    def command(self, *argv: str) -> list[str]:
        """``argv`` run on this host (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.namespace, *argv]


@dataclass
class Network:
    """A bridge and the hosts on it; :meth:`close` removes everything it made."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:4])
    hosts: list[Host] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bridge = f"mml{self.tag}br"
        used = subprocess.run(
            ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True
        ).stdout
        free = [n for n in range(1, 255) if f" {PREFIX}.{n}." not in used]
        self.subnet = f"{PREFIX}.{random.choice(free)}"
        #: This namespace's address on the bridge, where the hosts find its services.
        self.address = f"{self.subnet}.1"
        _ip("link", "add", self.bridge, "type", "bridge")
        try:
            _ip("addr", "add", f"{self.address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    def add_host(self, name: str) -> Host:
        n = len(self.hosts) + 1
        host = Host(
            name=name,
            namespace=f"mml-{self.tag}-{name}",
            address=f"{self.subnet}.{10 + n}",
            port=f"mml{self.tag}p{n}",
        )
        inside = f"mml{self.tag}i{n}"
        self.hosts.append(host)
        _ip("netns", "add", host.namespace)
        _ip("link", "add", host.port, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", host.namespace)
        _ip("link", "set", host.port, "master", self.bridge)
        _ip("link", "set", host.port, "up")
        ns = ("-n", host.namespace)
        _ip(*ns, "addr", "add", f"{host.address}/24", "dev", inside)
        _ip(*ns, "link", "set", inside, "up")
        _ip(*ns, "link", "set", "lo", "up")
        return host

    def cut(self, host: Host) -> None:
        """Pull the host's cable: its port on the bridge goes down."""
        _ip("link", "set", host.port, "down")

    def restore(self, host: Host) -> None:
        _ip("link", "set", host.port, "up")

    def close(self) -> None:
        for host in self.hosts:
            # Whatever still runs there (a test that failed half-way) goes first.
            pids = subprocess.run(
                ["ip", "netns", "pids", host.namespace], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "link", "del", host.port], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


class Relay:
    """Forwards TCP connections from ``listen`` (the bridge's address) to ``target`` on
    this machine, as a router would: bytes pass through untouched, one connection out
    per connection in, and a connection that stalls on one side stalls on the other.

    :meth:`cut` stops it forwarding anything, in either direction, until
    :meth:`restore`: what crosses it is held, and nothing is closed, as on a link that
    is down (a partition between one host and this service only). :meth:`cut_after`
    cuts it the moment a given request has gone through, to land the cut inside a
    chosen transaction.
    """

    def __init__(self, listen: str, target: tuple[str, int]) -> None:
        self.target = target
        self._server = socket.create_server((listen, 0))
        self.address, self.port = self._server.getsockname()[:2]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._up = threading.Event()
        self._up.set()
        self._trip: bytes | None = None
        #: Set when a :meth:`cut_after` cut happened.
        self.tripped = threading.Event()
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self._server.accept()
            except OSError:
                return
            try:
                outbound = socket.create_connection(self.target, timeout=10)
                outbound.settimeout(None)
            except OSError:
                inbound.close()
                continue
            with self._lock:
                if self._closed:
                    inbound.close()
                    outbound.close()
                    return
                self._sockets += [inbound, outbound]
            for source, sink, upstream in ((inbound, outbound, True), (outbound, inbound, False)):
                threading.Thread(
                    target=self._pipe,
                    args=(source, sink, upstream),
                    name="relay-pipe",
                    daemon=True,
                ).start()

    def cut(self) -> None:
        self._up.clear()

    def cut_after(self, marker: bytes) -> None:
        """Cut the link right after the first chunk a client sends that holds ``marker``
        (a statement's text) has been passed on to the service."""
        self._trip = marker

    def restore(self) -> None:
        self._up.set()

    def _pipe(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        try:
            while self._up.wait() and (data := source.recv(65536)):
                # Read while up, held while down: nothing read crosses a cut link.
                self._up.wait()
                sink.sendall(data)
                trip = self._trip
                if upstream and trip is not None and trip in data:
                    self._trip = None
                    self.cut()
                    self.tripped.set()
        except OSError:
            pass
        finally:
            # The other direction finds its socket ended too.
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._up.set()
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
