"""A tiny HTTP/1.1 app whose failure rate and latency are set by env or at run time.

    python -m tests.resilience_app --port 0 --ports-file F [--name N]
    env FAIL_EVERY=N (every N-th request answers 500; 0 = never), DELAY_MS=D

Control (straight to the app, not through the mesh):
    GET /_control?fail_every=N&delay_ms=D   sets both (missing = unchanged)
    GET /_count                              {"hits": requests served (not counting /_*), "name": N}
Any other request answers 200 "<name>\n" (or 500 "fail <name>\n"), after the delay.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
from urllib.parse import parse_qs, urlsplit


class App:
    def __init__(self, name: str) -> None:
        self.name = name
        self.fail_every = int(os.environ.get("FAIL_EVERY", "0"))
        self.delay = float(os.environ.get("DELAY_MS", "0")) / 1000.0
        self.hits = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                length = 0
                close = False
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                    elif name.strip().lower() == "connection" and "close" in value.lower():
                        close = True
                if length:
                    await reader.readexactly(length)
                status, body = await self.answer(method, target)
                writer.write(b"HTTP/1.1 %d X\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%b"
                             % (status, len(body), body))
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def answer(self, method: str, target: str) -> tuple[int, bytes]:
        url = urlsplit(target)
        if url.path == "/_count":
            return 200, json.dumps({"hits": self.hits, "name": self.name}).encode()
        if url.path == "/_control":
            q = parse_qs(url.query)
            if "fail_every" in q:
                self.fail_every = int(q["fail_every"][0])
            if "delay_ms" in q:
                self.delay = float(q["delay_ms"][0]) / 1000.0
            return 200, b"ok\n"
        self.hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_every and self.hits % self.fail_every == 0:
            return 500, f"fail {self.name}\n".encode()
        return 200, f"{self.name}\n".encode()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", "0")))
    ap.add_argument("--ports-file")
    ap.add_argument("--name", default=os.environ.get("APP_NAME", "app"))
    a = ap.parse_args()
    app = App(a.name)
    srv = await asyncio.start_server(app.handle, "127.0.0.1", a.port)
    port = srv.sockets[0].getsockname()[1]
    if a.ports_file:
        tmp = a.ports_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "http": port}, f)
        os.replace(tmp, a.ports_file)
    async with srv:
        await srv.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
