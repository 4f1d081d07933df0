"""build_body: the exact bytes of each event, field order, trimming, escaping, extras,
ts, and every field it refuses (a BodyError naming the field); with_server_id: the same
bytes with another server id. Pure: no network, no Flask.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from protocol_support import T

from flask_mmolove.protocol import FIELD_ORDER, BodyError, build_body, with_server_id


def test_build_body_registered_exact_bytes() -> None:
    body = build_body(
        "registered",
        token="tok-abc",
        server_id="srv-1",
        server_event_id="reg-7842",
        referee_identity="7842",
        ts=T,
        test=True,
    )
    assert body == (
        b'{"event":"registered","token":"tok-abc","server_id":"srv-1",'
        b'"referee_identity":"7842","server_event_id":"reg-7842","ts":1700000000,"test":true}'
    )


def test_build_body_qualified_exact_bytes() -> None:
    body = build_body("qualified", token="tok-abc", server_id="srv-1", server_event_id="q-1", ts=T)
    assert body == (
        b'{"event":"qualified","token":"tok-abc","server_id":"srv-1",'
        b'"server_event_id":"q-1","ts":1700000000}'
    )


def test_build_body_reversed_and_optional_referee_identity_keeps_key_order() -> None:
    body = build_body(
        "reversed", token="t", server_id="s", server_event_id="rev-1", referee_identity="p", ts=5
    )
    assert body == (
        b'{"event":"reversed","token":"t","server_id":"s","referee_identity":"p",'
        b'"server_event_id":"rev-1","ts":5}'
    )


def test_build_body_trims_strings() -> None:
    body = build_body(
        " registered\n",
        token="\t tok ",
        server_id=" srv ",
        server_event_id=" reg-1 ",
        referee_identity="  p-1\r\n",
        ts=T,
    )
    assert body == (
        b'{"event":"registered","token":"tok","server_id":"srv",'
        b'"referee_identity":"p-1","server_event_id":"reg-1","ts":1700000000}'
    )


def test_build_body_escapes_non_ascii_and_is_ascii() -> None:
    body = build_body(
        "registered",
        token="ä€",
        server_id="srv",
        server_event_id="reg-😀",
        referee_identity='a"b\\c',
        ts=T,
    )
    assert body == (
        b'{"event":"registered","token":"\\u00e4\\u20ac","server_id":"srv",'
        b'"referee_identity":"a\\"b\\\\c","server_event_id":"reg-\\ud83d\\ude00",'
        b'"ts":1700000000}'
    )
    assert json.loads(body)["token"] == "ä€"


_VALID: dict[str, Any] = {
    "token": "tok",
    "server_id": "srv",
    "server_event_id": "reg-1",
    "referee_identity": "p-1",
}


@pytest.mark.parametrize("field", ["event", "token", "server_id", "server_event_id"])
@pytest.mark.parametrize("value", ["", "   ", "\t\n", None, 5, b"tok", ["tok"]])
def test_build_body_required_fields(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"event": "registered", **_VALID, "ts": T}
    kwargs[field] = value
    event = kwargs.pop("event")
    with pytest.raises(BodyError) as info:
        build_body(event, **kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [None, "", "  ", 7842])
def test_build_body_referee_identity_required_on_registered(value: Any) -> None:
    kwargs = {**_VALID, "referee_identity": value}
    with pytest.raises(BodyError) as info:
        build_body("registered", ts=T, **kwargs)
    assert info.value.field == "referee_identity"


@pytest.mark.parametrize("event", ["signup", "Registered", "QUALIFIED", "registered2", "clicked"])
def test_build_body_unknown_event(event: str) -> None:
    with pytest.raises(BodyError) as info:
        build_body(event, ts=T, **_VALID)
    assert info.value.field == "event"
    assert repr(event) in str(info.value)


def test_build_body_extras_follow_protocol_fields_in_order() -> None:
    body = build_body(
        "qualified",
        token="t",
        server_id="s",
        server_event_id="q",
        ts=T,
        test=True,
        extra={"zeta": 1, "alpha": {"nested": [1, "ä"]}, "flag": None},
    )
    assert body == (
        b'{"event":"qualified","token":"t","server_id":"s","server_event_id":"q",'
        b'"ts":1700000000,"test":true,"zeta":1,"alpha":{"nested":[1,"\\u00e4"]},"flag":null}'
    )


@pytest.mark.parametrize("key", FIELD_ORDER)
def test_build_body_extras_cannot_overwrite_protocol_fields(key: str) -> None:
    with pytest.raises(BodyError) as info:
        build_body("registered", ts=T, extra={key: "sneaky"}, **_VALID)
    assert info.value.field == key


@pytest.mark.parametrize("value", [object(), {1, 2}, float("nan"), float("inf"), b"raw"])
def test_build_body_extras_must_be_json(value: Any) -> None:
    with pytest.raises(BodyError) as info:
        build_body("registered", ts=T, extra={"x": value}, **_VALID)
    assert info.value.field == "extra"


def test_build_body_ts_defaults_to_now() -> None:
    before = int(time.time())
    body = build_body("registered", **_VALID)
    after = int(time.time())
    ts = json.loads(body)["ts"]
    assert type(ts) is int
    assert before <= ts <= after


def test_build_body_explicit_ts_is_kept() -> None:
    assert json.loads(build_body("registered", ts=12345, **_VALID))["ts"] == 12345
    assert json.loads(build_body("registered", ts=T, **_VALID))["ts"] == T


@pytest.mark.parametrize("ts", [0, -1, True, False, 1.5, "1700000000"])
def test_build_body_rejects_bad_ts(ts: Any) -> None:
    with pytest.raises(BodyError) as info:
        build_body("registered", ts=ts, **_VALID)
    assert info.value.field == "ts"


def test_build_body_test_flag_only_when_true() -> None:
    assert list(json.loads(build_body("registered", ts=T, **_VALID))) == [
        "event",
        "token",
        "server_id",
        "referee_identity",
        "server_event_id",
        "ts",
    ]
    assert b'"test"' not in build_body("registered", ts=T, test=False, **_VALID)
    with_test = build_body("registered", ts=T, test=True, **_VALID)
    assert with_test.endswith(b',"ts":1700000000,"test":true}')


def test_extra_field_names_must_be_strings() -> None:
    with pytest.raises(BodyError, match="names must be strings"):
        build_body(
            "qualified",
            token="tok",
            server_id="srv",
            server_event_id="q-1",
            extra={1: "a", "1": "b"},  # type: ignore[dict-item]
        )


# --- with_server_id: the server id in force at send ----------------------------------


def test_with_server_id_exact_bytes() -> None:
    body = build_body(
        "registered",
        token="tok-abc",
        server_id="srv-typo",
        server_event_id="reg-7842",
        referee_identity='Zoë \u2603 "q"',
        ts=T,
        test=True,
        extra={"campaign": {"name": "spring", "ratio": 0.1, "big": 2**70}, "n": [1, 2.5]},
    )
    fixed = with_server_id(body, " srv-1 ")
    assert fixed == build_body(
        "registered",
        token="tok-abc",
        server_id="srv-1",
        server_event_id="reg-7842",
        referee_identity='Zoë \u2603 "q"',
        ts=T,
        test=True,
        extra={"campaign": {"name": "spring", "ratio": 0.1, "big": 2**70}, "n": [1, 2.5]},
    )
    assert fixed == (
        b'{"event":"registered","token":"tok-abc","server_id":"srv-1",'
        b'"referee_identity":"Zo\\u00eb \\u2603 \\"q\\"","server_event_id":"reg-7842",'
        b'"ts":1700000000,"test":true,'
        b'"campaign":{"name":"spring","ratio":0.1,"big":1180591620717411303424},"n":[1,2.5]}'
    )


def test_with_server_id_keeps_the_very_bytes_when_the_id_is_the_same() -> None:
    # Not re-serialised: a body stored by hand, in another spacing, goes as stored.
    body = b'{"event": "qualified", "token": "t", "server_id": "srv-1", "ts": 1}'
    assert with_server_id(body, "srv-1") is body


def test_with_server_id_changes_only_the_top_level_server_id() -> None:
    body = b'{"event":"qualified","server_id":"old","x":{"server_id":"old"},"token":"t"}'
    assert with_server_id(body, "new") == (
        b'{"event":"qualified","server_id":"new","x":{"server_id":"old"},"token":"t"}'
    )


@pytest.mark.parametrize(
    "body", [b"not json", b"[1,2]", b'{"event":"qualified"}', b'{"server_id":7}', b"\xff", b"NaN"]
)
def test_with_server_id_leaves_a_body_it_cannot_read_as_it_is(body: bytes) -> None:
    assert with_server_id(body, "srv-1") is body


@pytest.mark.parametrize("server_id", ["", "   ", None, 7])
def test_with_server_id_refuses_an_unusable_server_id(server_id: Any) -> None:
    with pytest.raises(BodyError) as info:
        with_server_id(b'{"server_id":"a"}', server_id)
    assert info.value.field == "server_id"
