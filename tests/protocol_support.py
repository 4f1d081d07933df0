"""Values the protocol tests (tests/protocol/) share: a signing time, a secret, a body."""

from __future__ import annotations

T = 1_700_000_000
SECRET = "whsec_test_5f2a"
BODY = b'{"event":"qualified","token":"tok","server_id":"srv","server_event_id":"q-1","ts":1}'
