"""The ``mmolove`` pytest plugin, as a user's test suite sees it."""

from __future__ import annotations

import pytest

import flask_mmolove.pytest_plugin as plugin

FIXTURES = (
    "mmolove_sandbox",
    "mmolove_sandbox_factory",
    "mmolove_client",
    "mmolove_live_callbacks",
)


def test_sandbox_fixture_receives_a_signed_event(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import requests
        from flask_mmolove import Outcome, ReferralClient

        URLS = []

        def test_event_arrives(mmolove_sandbox):
            token = mmolove_sandbox.mint_token("friend")
            with ReferralClient(
                mmolove_sandbox.server_id, mmolove_sandbox.secret, mmolove_sandbox.endpoint
            ) as client:
                result = client.registered(
                    token, referee_identity="p1", server_event_id="reg-p1"
                )
            assert result.outcome is Outcome.ADVANCED
            [record] = mmolove_sandbox.events
            assert (record.event, record.token, record.verdict) == (
                "registered", token, "advanced"
            )
            assert mmolove_sandbox.accepted_count("registered") == 1
            URLS.append(mmolove_sandbox.url)

        def test_each_test_gets_a_fresh_sandbox_and_the_last_one_is_stopped(
            mmolove_sandbox, mmolove_client
        ):
            assert mmolove_sandbox.events == []
            assert mmolove_sandbox.url != URLS[0]
            try:
                requests.get(URLS[0] + "/log", timeout=2)
            except requests.ConnectionError:
                pass
            else:
                raise AssertionError("the previous test's sandbox is still serving")
            result = mmolove_client.qualified(
                mmolove_sandbox.mint_token(), server_event_id="qual-p1"
            )
            assert result.status == 422

        def test_factory_takes_settings(mmolove_sandbox_factory):
            now = [1_700_000_000.0]
            sandbox = mmolove_sandbox_factory(server_id="custom", clock=lambda: now[0])
            assert sandbox.server_id == "custom"
            assert sandbox.running
        """
    )
    result = pytester.runpytest_subprocess("-W", "error", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_fixtures_are_not_autouse(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import threading

        def test_nothing_started_unasked(request):
            assert not [n for n in request.fixturenames if n.startswith("mmolove_")]
            assert not [t for t in threading.enumerate() if t.name.startswith("mmolove")]
        """
    )
    result = pytester.runpytest_subprocess("-W", "error", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_fixtures_are_listed_with_their_docs(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "*mmolove_sandbox_factory*",
            "*Start sandboxes with custom settings*",
            "*mmolove_sandbox*",
            "*A running MMOLove sandbox*",
        ]
    )
    for name in FIXTURES:
        assert name in result.stdout.str()


def test_plugin_can_be_disabled(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_uses(mmolove_sandbox): pass")
    result = pytester.runpytest_subprocess("-p", "no:mmolove", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'mmolove_sandbox' not found*"])


@pytest.mark.parametrize("name", FIXTURES)
def test_every_fixture_is_documented(name: str) -> None:
    fixture = getattr(plugin, name)
    # pytest wraps fixture functions; the docstring is what `pytest --fixtures` shows.
    doc = getattr(fixture, "__doc__", None) or ""
    assert len(doc.strip()) > 20
