"""The MMOLove Python guide's from-scratch client, verbatim: the reference we must match.

Copied from the "Python" SDK guide (/work/shared/referral-kit-python-guide.txt, "The
client"). The only change: ``ENDPOINT`` is also a parameter, so tests can point it at a
local server. The body-building and signing lines are byte-for-byte the guide's; the
``fmt: off`` block keeps the formatter from touching them.
"""

# fmt: off
import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request

ENDPOINT = "https://mmolove.com/api/referral/events"


def mmolove_send_event(
    secret: str, server_id: str, event: str, extra: dict, endpoint: str = ENDPOINT
) -> tuple[int, str]:
    """Report a referral lifecycle event to MMOLove with an HMAC-signed body.

    Returns (status_code, response_body). status_code 0 means a transport error.
    """
    # Build the body ONCE. Sign these exact bytes; send these exact bytes.
    payload = {"event": event, "server_id": server_id, "ts": int(time.time()), **extra}
    raw = json.dumps(payload, separators=(",", ":"))   # compact, stable

    # HMAC-SHA256 over "<t>.<rawBody>" (timestamp, a dot, then the raw body).
    t = int(time.time())
    mac = hmac.new(secret.encode(), f"{t}.{raw}".encode(), hashlib.sha256).hexdigest()
    sig = f"t={t},v1=sha256={mac}"

    req = urllib.request.Request(  # noqa: S310 (the tests' own endpoint)
        endpoint,
        data=raw.encode(),                              # the SAME bytes we signed
        headers={"Content-Type": "application/json", "X-MMOLove-Signature": sig},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as res:  # noqa: S310 (trusted)
            return res.status, res.read().decode()
    except urllib.error.HTTPError as e:
        # 4xx / 5xx come back here — read the JSON error body.
        return e.code, e.read().decode()
    except urllib.error.URLError as e:
        # Transport failure (DNS/timeout). Treat like a 5xx: retry with backoff.
        return 0, str(e)
# fmt: on
