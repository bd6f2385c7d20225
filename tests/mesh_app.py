"""A small app for the end-to-end tests: ``python -m tests.mesh_app --ports-file F``.

It listens on two loopback ports and writes ``{"pid", "http", "echo"}`` to the ports file once
both accept connections:

http (hand-written HTTP/1.1 on asyncio streams, keep-alive, so every framing case is ours):
  any path              200 JSON {"method", "path", "version", "headers": {name: [values]},
                        "body_bytes", "body_crc"}; the request body is read (Content-Length or
                        chunked) and checksummed, never kept. ``Expect: 100-continue`` gets a
                        ``100 Continue`` before the body is read.
  /slow?ms=N            the same, after N ms
  ?stall_ms=N           (any path) wait N ms before reading the request body
  /download?bytes=N[&chunked=1]   N bytes of ``pattern()``, streamed, with a length or chunked
  /chunked              a chunked response of several chunks
  /status/N             status N (204 and 304 without a body)
  /http10               an HTTP/1.0 response without a length, ended by closing the connection
  HEAD                  the GET headers (with content-length), no body

echo: a raw TCP echo server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import zlib
from urllib.parse import parse_qs, urlsplit

BLOCK = 64 * 1024
REASONS = {100: "Continue", 200: "OK", 204: "No Content", 304: "Not Modified", 400: "Bad Request",
           404: "Not Found", 500: "Internal Server Error"}


def pattern_block(offset: int = 0) -> bytes:
    """The repeating byte pattern every generated body uses (tests regenerate it to compare)."""
    base = bytes(range(256)) * (BLOCK // 256 + 1)
    return base[offset % 256: offset % 256 + BLOCK]


def pattern_crc(n: int) -> int:
    """crc32 of the first ``n`` bytes of the pattern, without materialising them."""
    crc, done = 0, 0
    block = pattern_block()
    while done < n:
        part = block if n - done >= BLOCK else block[: n - done]
        crc = zlib.crc32(part, crc)
        done += len(part)  # BLOCK is a multiple of 256, so the next block starts in phase
    return crc


class BadRequest(Exception):
    pass


async def read_head(reader: asyncio.StreamReader) -> tuple[str, str, str, list[tuple[str, str]]] | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = raw[:-4].decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise BadRequest(lines[0]) from None
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return method, target, version, headers


async def read_body(reader: asyncio.StreamReader, headers: dict[str, list[str]]) -> tuple[int, int]:
    """Consume the body; return (length, crc32)."""
    n, crc = 0, 0
    if "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return n, crc
            left = size
            while left:
                data = await reader.read(min(left, BLOCK))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                crc = zlib.crc32(data, crc)
                n += len(data)
                left -= len(data)
            await reader.readexactly(2)
    left = int(headers.get("content-length", ["0"])[0])
    while left:
        data = await reader.read(min(left, BLOCK))
        if not data:
            raise asyncio.IncompleteReadError(b"", left)
        crc = zlib.crc32(data, crc)
        n += len(data)
        left -= len(data)
    return n, crc


def head(status: int, headers: list[tuple[str, str]], version: str = "HTTP/1.1") -> bytes:
    lines = [f"{version} {status} {REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def handle_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            req = await read_head(reader)
            if req is None:
                return
            method, target, version, hlist = req
            headers: dict[str, list[str]] = {}
            for k, v in hlist:
                headers.setdefault(k, []).append(v)
            url = urlsplit(target)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            path = url.path
            if "100-continue" in [v.lower() for v in headers.get("expect", [])]:
                writer.write(head(100, []))
            if "stall_ms" in q:  # a slow reader: leave the body unread for a while
                await asyncio.sleep(int(q["stall_ms"]) / 1000)
            body_bytes, body_crc = await read_body(reader, headers)
            close = version == "HTTP/1.0" or "close" in ",".join(headers.get("connection", [])).lower()
            conn_hdr = [("connection", "close")] if close else []
            if path == "/slow":
                await asyncio.sleep(int(q.get("ms", "1000")) / 1000)
            if path == "/download":
                total = int(q["bytes"])
                chunked = q.get("chunked") == "1"
                frame = [("transfer-encoding", "chunked")] if chunked else [("content-length", str(total))]
                writer.write(head(200, [("content-type", "application/octet-stream"), *frame, *conn_hdr]))
                if method != "HEAD":
                    sent, block = 0, pattern_block()
                    while sent < total:
                        part = block if total - sent >= BLOCK else block[: total - sent]
                        writer.write(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
                        sent += len(part)
                        await writer.drain()
                    if chunked:
                        writer.write(b"0\r\n\r\n")
            elif path == "/chunked":
                writer.write(head(200, [("content-type", "text/plain"), ("transfer-encoding", "chunked"),
                                        *conn_hdr]))
                if method != "HEAD":
                    for i in range(5):
                        part = f"chunk-{i};".encode()
                        writer.write(b"%x\r\n%b\r\n" % (len(part), part))
                        await writer.drain()
                    writer.write(b"0\r\n\r\n")
            elif path.startswith("/status/"):
                status = int(path.rsplit("/", 1)[1])
                if status in (204, 304):
                    writer.write(head(status, [("x-app", "yes"), *conn_hdr]))
                else:
                    body = f"status {status}\n".encode()
                    writer.write(head(status, [("content-length", str(len(body))), *conn_hdr]))
                    if method != "HEAD":
                        writer.write(body)
            elif path == "/http10":
                writer.write(head(200, [("content-type", "text/plain")], version="HTTP/1.0"))
                if method != "HEAD":
                    for i in range(3):
                        writer.write(b"no-length-%d;" % i)
                        await writer.drain()
                await writer.drain()
                return  # the close ends the body
            else:
                body = json.dumps({"method": method, "path": target, "version": version,
                                   "headers": headers, "body_bytes": body_bytes,
                                   "body_crc": body_crc}).encode()
                writer.write(head(200, [("content-type", "application/json"),
                                        ("content-length", str(len(body))), *conn_hdr]))
                if method != "HEAD":
                    writer.write(body)
            await writer.drain()
            if close:
                return
    except (BadRequest, ValueError, KeyError):
        writer.write(head(400, [("content-length", "0"), ("connection", "close")]))
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - already gone
            pass


async def handle_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BLOCK):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(ports_file: str) -> None:
    http = await asyncio.start_server(handle_http, "127.0.0.1", 0, limit=256 * 1024)
    echo = await asyncio.start_server(handle_echo, "127.0.0.1", 0)
    ports = {"pid": os.getpid(), "http": http.sockets[0].getsockname()[1],
             "echo": echo.sockets[0].getsockname()[1]}
    tmp = ports_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ports, f)
    os.replace(tmp, ports_file)
    await asyncio.Event().wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--ports-file", required=True)
    args = ap.parse_args()
    try:
        asyncio.run(main(args.ports_file))
    except KeyboardInterrupt:
        pass
