"""A minimal, fast HTTP sink that answers every request as MMOLove accepts a
``registered``: ``200 {"ok":true,"referral_id":"ref_0","state":"registered"}`` (a
documented acceptance: a dry run's answer would hold the events, not deliver them).

For measuring a worker's own costs (memory over 100k events, the floor of an HTTP
round trip) without the sandbox's checks in the way. asyncio, HTTP/1.1 keep-alive,
bodies read by ``Content-Length``; nothing is verified. Prints ``{"port": N}`` once it
listens and stops when stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys

ANSWER = b'{"ok":true,"referral_id":"ref_0","state":"registered"}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(ANSWER)).encode()
    + b"\r\n\r\n"
    + ANSWER
)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length:
                await reader.readexactly(length)
            writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    except asyncio.CancelledError:  # the sink is stopping
        return
    finally:
        writer.close()


async def serve() -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=256)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": port}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    # Keep-alive connections may still be open: do not wait for them.
    server.close()


def main() -> int:
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
