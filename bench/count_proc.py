"""The request loop of the overhead benchmark, for counting instructions under callgrind.

Run by the benchmarks, not by people: ``valgrind --tool=callgrind --dump-before=getppid
python -m bench.count_proc PORTAL DATABASE N1 N2 KIND...``. Each ``os.getppid()`` call
marks a phase boundary, where callgrind writes the instructions counted since the last
one; the phases are printed in order on stdout (one JSON list), so the parent can pair
each dump with what ran in it. For every kind: a warm-up, then ``N1`` and ``N2``
requests; the difference of the two phases divided by ``N2 - N1`` is the cost of one
request, with everything a phase does once (the marker itself) cancelled out.
"""

from __future__ import annotations

import json
import os
import sys

from flask import Flask

from .overhead import WARM_UP, environ_for, request_kinds, serve
from .portals import plain_portal, referral_portal


def build(portal: str, database: str) -> Flask:
    if portal == "plain":
        return plain_portal()
    # Worker mode: no delivery thread whose polling callgrind would count as well. The
    # request hook does the same work in every mode.
    return referral_portal(
        {
            "MMOLOVE_SERVER_ID": "bench",
            "MMOLOVE_REFERRAL_SECRET": "bench-secret",
            "MMOLOVE_ENDPOINT": "http://127.0.0.1:9/api/referral/events",
            "MMOLOVE_DATABASE_URI": database,
            "MMOLOVE_DELIVERY": "worker",
        }
    )


def main(argv: list[str]) -> None:
    portal, database, n1, n2, *keys = argv
    app = build(portal, database)
    kinds = {kind.key: kind for kind in request_kinds(plain_portal())}
    phases: list[str] = []

    def boundary(label: str) -> None:
        os.getppid()  # callgrind dumps what it counted since the last boundary
        phases.append(label)

    for key in keys:
        environ = environ_for(kinds[key])
        serve(app, environ, WARM_UP)
        boundary(f"warm-up:{key}")
        serve(app, environ, int(n1))
        boundary(f"n1:{key}")
        serve(app, environ, int(n2))
        boundary(f"n2:{key}")
    print(json.dumps(phases))


if __name__ == "__main__":
    main(sys.argv[1:])
