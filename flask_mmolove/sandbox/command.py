"""``python -m flask_mmolove.sandbox``: run the sandbox until interrupted."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Final
from urllib.parse import quote

from werkzeug.serving import make_server

from ..protocol import DEFAULT_TOLERANCE
from .app import INGEST_PATH, create_sandbox_app
from .server import handler_class

SECRET_ENV: Final = "MMOLOVE_REFERRAL_SECRET"  # noqa: S105 (a variable's name)
SERVER_ID_ENV: Final = "MMOLOVE_SERVER_ID"
TOKEN_KEY_ENV: Final = "MMOLOVE_SANDBOX_TOKEN_KEY"  # noqa: S105 (a variable's name)


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flask_mmolove.sandbox",
        description=(
            "Run an MMOLove-compatible sandbox: the referral ingest endpoint, share links "
            "that mint real mmref tokens, a delivery log at /log and scriptable faults."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=8765, help="port, 0 for any free one (default: %(default)s)"
    )
    parser.add_argument(
        "--secret",
        default=None,
        help=(
            f"the per-server signing secret; prefer ${SECRET_ENV}, since a command line "
            "is visible to other users of the machine"
        ),
    )
    parser.add_argument(
        "--server-id",
        default=env.get(SERVER_ID_ENV),
        help=f"the server id events must carry (default: ${SERVER_ID_ENV})",
    )
    parser.add_argument(
        "--registration-url",
        required=True,
        help="where share links redirect, with ?mmref=<token> added",
    )
    parser.add_argument(
        "--tolerance",
        type=int,
        default=DEFAULT_TOLERANCE,
        help="replay window in seconds, either way (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None) -> int:
    """Run the sandbox in the foreground; returns the exit status.

    ``env`` (default: the process environment) supplies the secret and server id when
    the options are absent, so a caller can pass the secret without putting it in argv.
    """
    env = os.environ if env is None else env
    parser = build_parser(env)
    args = parser.parse_args(argv)
    # Read here, not as an argparse default, so --help never prints the secret.
    secret = args.secret or env.get(SECRET_ENV)
    if not secret:
        parser.error(f"a secret is required: set ${SECRET_ENV} or pass --secret")
    if not args.server_id:
        parser.error(f"a server id is required: pass --server-id or set ${SERVER_ID_ENV}")
    try:
        app = create_sandbox_app(
            secret=secret,
            server_id=args.server_id,
            registration_url=args.registration_url,
            token_key=env.get(TOKEN_KEY_ENV) or None,
            tolerance=args.tolerance,
        )
        server = make_server(
            args.host, args.port, app, threaded=True, request_handler=handler_class()
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host = f"[{server.host}]" if ":" in server.host else server.host
    base = f"http://{host}:{server.port}"
    print(f"MMOLove sandbox for server {args.server_id!r}", flush=True)
    print(f"  endpoint:   {base}{INGEST_PATH}", flush=True)
    print(f"  share link: {base}/r/{quote(args.server_id, safe='')}?ref=friend", flush=True)
    print(f"  log:        {base}/log", flush=True)
    # werkzeug's serve_forever swallows Ctrl-C and closes the socket itself.
    server.serve_forever()
    return 0
