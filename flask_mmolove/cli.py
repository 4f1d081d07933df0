"""``flask mmolove ...``: run a worker, look at the outbox, requeue, write an event
again, ping, sandbox, and the standalone outbox's schema."""

from __future__ import annotations

import signal
import time
from email.utils import parsedate_to_datetime
from types import FrameType

import click
from flask.cli import with_appcontext

from .client import ReferralClient
from .delivery import PassReport, run_worker
from .outbox import Outbox, OutboxError
from .protocol import build_body, classify
from .redaction import Redactor
from .referrals import record_qualification, record_registration
from .state import Delivery, MMOLoveState, get_state

#: A dry run needs a token-shaped value; whether MMOLove looks it up is not documented.
PING_TOKEN = "flask-mmolove-ping"  # noqa: S105 - not a secret


@click.group("mmolove")
def mmolove_group() -> None:
    """MMOLove referral delivery: worker, status, retry, enqueue, ping, sandbox, db."""


def _require_active() -> tuple[MMOLoveState, Delivery]:
    state = get_state()
    if state.delivery is None:
        raise click.ClickException("MMOLOVE_ENABLED is false for this app: nothing to do.")
    return state, state.delivery


def _paused(state: MMOLoveState) -> str | None:
    """Why nothing is sent ("delivery is paused: ... not set"), and what to do; or None."""
    if state.settings.paused is None:
        return None
    them = "them" if len(state.settings.missing) > 1 else "it"
    return (
        f"{state.settings.paused}: copy {them} from MMOLove's Referrals tab into the "
        "environment and start again; the events wait in the outbox meanwhile"
    )


def _require_client() -> tuple[MMOLoveState, Delivery, ReferralClient]:
    """For the commands that talk to MMOLove: refused, naming the key, while paused."""
    state, delivery = _require_active()
    client = delivery.deliverer.client
    if client is None:
        raise click.ClickException(_paused(state) or "delivery is paused")
    return state, delivery, client


@mmolove_group.command("worker")
@click.option("--burst", is_flag=True, help="Deliver what is due now, then exit.")
@with_appcontext
def worker_command(burst: bool) -> None:
    """Deliver events from the outbox until stopped.

    SIGTERM or Ctrl-C: no new send starts, sends in flight end within
    MMOLOVE_CONNECT_TIMEOUT + MMOLOVE_READ_TIMEOUT, and claims not sent are handed back.
    """
    _, delivery, client = _require_client()
    deliverer = delivery.deliverer
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def progress(report: PassReport) -> None:
        click.echo(
            f"claimed {report.claimed}: delivered {report.delivered}, "
            f"retrying {report.retried}, dead {report.dead}, handed back {report.released}, "
            f"credited {report.credited}"
        )

    click.echo(f"mmolove worker {deliverer.owner} delivering to {client.endpoint}")
    total = run_worker(deliverer, burst=burst, should_stop=lambda: stopping, on_pass=progress)
    click.echo(f"stopped: delivered {total.delivered}, retrying {total.retried}, dead {total.dead}")


@mmolove_group.command("status")
@with_appcontext
def status_command() -> None:
    """Counts by state, the oldest pending event's age, and the dead letters."""
    state, delivery = _require_active()
    outbox = delivery.outbox
    stats = outbox.stats()
    age = "-" if stats.oldest_pending_age is None else f"{stats.oldest_pending_age:.0f} s"
    paused = _paused(state)
    if paused is not None:
        click.echo(paused)
    click.echo(f"endpoint:   {state.settings.endpoint}")
    click.echo(f"delivery:   {state.settings.delivery}")
    click.echo(f"pending:    {stats.pending} (in flight {stats.in_flight}, oldest {age})")
    click.echo(f"delivered:  {stats.delivered}")
    click.echo(f"dead:       {stats.dead}")
    click.echo(f"credits to announce: {stats.credits_unnotified}")
    if state.settings.callback_secrets:
        hearts = outbox.heart_stats()
        click.echo(
            f"votes:      {hearts.received} received, {hearts.granted} announced, "
            f"{hearts.tests} test callback(s)"
        )
    waiting = [e for e in outbox.list_events(state="pending", limit=200) if e.last_reason]
    for event in waiting[:20]:
        due = max(0.0, event.next_attempt_at - time.time())
        click.echo(
            f"  retrying #{event.id} {event.event} {event.server_event_id} in {due:.0f} s "
            f"(attempt {event.attempts}): status {event.last_status}, {event.last_reason}"
        )
    for event in outbox.list_events(state="dead", limit=20):
        click.echo(
            f"  dead #{event.id} {event.event} {event.server_event_id}: "
            f"status {event.last_status}, {event.last_reason}: {(event.last_error or '')[:120]}"
        )
    if waiting or stats.dead:
        click.echo("requeue with: flask mmolove retry ID... (or --all for every undelivered event)")


@mmolove_group.command("retry")
@click.argument("ids", nargs=-1, type=int)
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Requeue every undelivered event not in flight: dead letters, events waiting on "
    "backoff, and events held after a 401.",
)
@with_appcontext
def retry_command(ids: tuple[int, ...], everything: bool) -> None:
    """Requeue events to be sent now: dead letters, or events waiting on backoff or held
    after a 401 (say, once MMOLOVE_SERVER_ID or the secret is fixed). Events in flight
    and delivered ones are left alone; a dead letter starts over at zero attempts."""
    if not ids and not everything:
        raise click.UsageError(
            "name the event ids to requeue, or pass --all for every undelivered event"
        )
    state, delivery = _require_active()
    requeued = delivery.outbox.requeue(list(ids) if ids else None)
    click.echo(f"requeued {requeued} event(s)")
    if requeued:
        state.dispatch(list(ids) if ids else None)


@mmolove_group.command("enqueue")
@click.argument("event", type=click.Choice(["registered", "qualified"]))
@click.option("--identity", required=True, help="The referee's stable id (as set_referee).")
@click.option(
    "--token",
    help="The referral token; required for registered, for qualified the bound one if not given.",
)
@click.option("--server-event-id", help="qualified only: the id the portal gave it, if any.")
@with_appcontext
def enqueue_command(
    event: str, identity: str, token: str | None, server_event_id: str | None
) -> None:
    """Write an event again that a failed write lost (the ERROR log gives the command).

    Idempotent: an event stored already is not stored twice, and MMOLove dedups what
    it received already.
    """
    state, _ = _require_active()
    if event == "registered":
        if token is None:
            raise click.UsageError("registered needs --token: the token the referee came with")
        if server_event_id is not None:
            raise click.UsageError("--server-event-id is for qualified only")
        written = record_registration(identity, token=token)
    else:
        try:
            written = record_qualification(identity, token=token, server_event_id=server_event_id)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    if not written:
        raise click.ClickException(
            f"nothing written: {identity!r} is not a referee of this portal (no token bound "
            "to it); pass --token to name the token"
            if event == "qualified"
            else f"nothing written: {identity!r} cannot be a referee identity"
        )
    if state.portal_db is not None:
        # Outside a request the write waits in the portal's session: commit it.
        state.portal_db.commit()
    click.echo(f"{event} of referee {identity} is in the outbox")


@mmolove_group.command("ping")
@with_appcontext
def ping_command() -> None:
    """Send a signed dry run: checks the endpoint, server id, secret and clock."""
    state, _, client = _require_client()
    now = int(time.time())
    body = build_body(
        "registered",
        token=PING_TOKEN,
        server_id=state.settings.server_id,
        referee_identity=PING_TOKEN,
        server_event_id=f"ping-{now}",
        test=True,
    )
    try:
        result = client.send_body(body)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"endpoint:   {client.endpoint}")
    click.echo(f"status:     {result.status} ({result.outcome.value if result.outcome else '-'})")
    click.echo(f"round trip: {result.elapsed * 1000:.0f} ms")
    date = result.headers.get("Date")
    if date:
        try:
            skew = parsedate_to_datetime(date).timestamp() - (now + result.elapsed / 2)
        except (TypeError, ValueError):
            skew = None
        if skew is not None:
            warn = "  (over a minute: fix this machine's clock)" if abs(skew) > 60 else ""
            click.echo(f"clock skew: {skew:+.0f} s against MMOLove's Date header{warn}")
    if not result.ok:
        hint = classify(result.status).hint
        if result.status == 404:
            # MMOLove picks the secret by server id: a dry run for a server it does not
            # know is a 404, however right the secret (protocol.md section 8).
            hint = (
                f"MMOLove does not know server {state.settings.server_id!r}: check "
                f"MMOLOVE_SERVER_ID against the Referrals tab. {hint}"
            )
        # Redacted before it is cut short, as delivery does: an endpoint that echoes
        # the secret (a debug page, a misconfigured proxy) must not put it on screen.
        said = Redactor(state.settings.secret)(result.body)[:300]
        raise click.ClickException(f"{hint}. MMOLove said: {said}")


@mmolove_group.command(
    "sandbox", context_settings={"ignore_unknown_options": True, "allow_extra_args": True}
)
@click.pass_context
@with_appcontext
def sandbox_command(ctx: click.Context) -> None:
    """Run a local MMOLove sandbox (same options as `python -m flask_mmolove.sandbox`).

    --secret and --server-id default to this app's settings, so the portal can point
    MMOLOVE_ENDPOINT at it unchanged.
    """
    from .sandbox.command import main

    settings = get_state().settings
    args = list(ctx.args)
    if "--server-id" not in args and "MMOLOVE_SERVER_ID" not in settings.missing:
        args += ["--server-id", settings.server_id]
    env = None
    if "--secret" not in args and settings.secret:
        env = {"MMOLOVE_REFERRAL_SECRET": settings.secret.reveal()}
    raise SystemExit(main(args, env=env))


@mmolove_group.group("db")
def db_group() -> None:
    """The standalone outbox's schema: its version, and upgrading it."""


def _standalone_outbox() -> Outbox:
    state = get_state()
    if state.portal_db is not None:
        raise click.ClickException(
            "the outbox tables are the portal's (MMOLove(app, db=db)): its own migrations "
            "create and change them; run `flask db migrate` and `flask db upgrade` instead"
        )
    if state.outbox is None:
        raise click.ClickException("MMOLOVE_ENABLED is false for this app: no outbox to upgrade.")
    return state.outbox


@db_group.command("upgrade")
@with_appcontext
def db_upgrade_command() -> None:
    """Migrate the outbox's schema to this version's; its events are kept."""
    outbox = _standalone_outbox()
    click.echo(f"outbox: {outbox.engine.url.render_as_string(hide_password=True)}")
    try:
        before, after = outbox.upgrade()
    except OutboxError as exc:
        raise click.ClickException(str(exc)) from None
    if before.revision == after.revision:
        click.echo(f"schema already at {after}: nothing to do")
    else:
        click.echo(f"schema upgraded from {before} to {after}")


@db_group.command("current")
@with_appcontext
def db_current_command() -> None:
    """Show the outbox's schema version, and whether it needs `flask mmolove db upgrade`."""
    outbox = _standalone_outbox()
    click.echo(f"outbox: {outbox.engine.url.render_as_string(hide_password=True)}")
    try:
        version = outbox.schema_version()
    except OutboxError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"schema: {version}")
    if version.current:
        click.echo("up to date")
    elif version.known:
        click.echo(f"behind {version.head}: run `flask mmolove db upgrade`")
    else:
        click.echo(f"newer than this flask-mmolove knows (its newest is {version.head})")
