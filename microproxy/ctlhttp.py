"""JSON over HTTP/1.1 for the control plane (h11: correct and plenty fast at control-plane rates).

One server and one client, shared by identity, destination, the proxy and the CLI.

Server: ``await serve(handler, host, port, ssl=ctx)``; the handler gets a ``Request`` and
returns a ``Response`` or a ``Stream`` (an async iterator of byte chunks sent chunked, for
watches). Malformed HTTP gets 400 and the connection closed; bodies over ``max_body`` get
413; a handler exception is logged once and answered with 500 — never a traceback on the wire.

Client: ``Client(host, port, ssl, server_hostname)`` keeps one persistent connection for
``request()``; ``watch()`` opens a dedicated connection and yields NDJSON objects;
``keep_watching()`` watches for as long as the caller lives, reconnecting with backoff.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl as ssl_mod
from email.utils import formatdate
from http import HTTPStatus
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

from .tls import peer_identity

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
READ_SIZE = 65536


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    peer_identity: str | None
    peer: Any

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> "Response":
        return cls(status, json.dumps(obj).encode() + b"\n", [("content-type", "application/json")])

    @classmethod
    def error(cls, status: int, message: str) -> "Response":
        return cls.json({"error": message}, status)


@dataclass(slots=True)
class Stream:
    chunks: AsyncIterator[bytes]
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=lambda: [("content-type", "application/x-ndjson")])


Handler = Callable[[Request], Awaitable["Response | Stream"]]


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, conn: h11.Connection, event: Any) -> None:
        data = conn.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def next_event(self, conn: h11.Connection, timeout: float | None) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), timeout)
            conn.receive_data(data)


async def serve(handler: Handler, host: str, port: int, ssl: ssl_mod.SSLContext | None = None,
                max_body: int = MAX_BODY, idle_timeout: float = 300.0) -> asyncio.Server:
    tasks: set[asyncio.Task[None]] = set()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await _serve_conn(handler, reader, writer, max_body, idle_timeout)
        except asyncio.CancelledError:
            # Shutdown cancelled this connection; ending is the point and nobody awaits this
            # task. Re-raising makes Python 3.11's streams done-callback (task.exception()
            # on a cancelled task) log a spurious "Exception in callback" traceback.
            return
        finally:
            tasks.discard(task)
            writer.close()

    return await asyncio.start_server(on_client, host, port, ssl=ssl, limit=READ_SIZE)


async def _serve_conn(handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      max_body: int, idle_timeout: float) -> None:
    io = _Conn(reader, writer)
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    ident = peer_identity(writer.get_extra_info("ssl_object"))
    peer = writer.get_extra_info("peername")
    while True:
        try:
            event = await io.next_event(conn, idle_timeout)
            if isinstance(event, (h11.ConnectionClosed, h11.EndOfMessage)) or event is h11.PAUSED:
                return
            assert isinstance(event, h11.Request)
            body = bytearray()
            too_big = False
            while True:
                ev = await io.next_event(conn, 30.0)
                if isinstance(ev, h11.Data):
                    body += ev.data
                    if len(body) > max_body:
                        too_big = True
                        break
                elif isinstance(ev, h11.EndOfMessage):
                    break
                elif isinstance(ev, h11.ConnectionClosed):
                    return
        except h11.RemoteProtocolError as e:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                resp = Response.error(e.error_status_hint or 400, f"bad request: {e}")
                await _send_response(io, conn, resp, close=True)
            return
        except (asyncio.TimeoutError, ConnectionError, ssl_mod.SSLError, OSError):
            return
        if too_big:
            await _send_response(io, conn, Response.error(413, f"body over {max_body} bytes"), close=True)
            return
        target = event.target.decode("latin-1")
        parts = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
        req = Request(event.method.decode("ascii"), parts.path, query, headers, bytes(body), ident, peer)
        try:
            result = await handler(req)
        except asyncio.CancelledError:
            raise
        except Exception:  # task boundary: log once, answer 500
            log.exception("handler failed", extra={"path": req.path})
            result = Response.error(500, "internal error")
        try:
            if isinstance(result, Stream):
                await _send_stream(io, conn, result)
                return
            await _send_response(io, conn, result, close=False)
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
        except (ConnectionError, ssl_mod.SSLError, OSError, h11.LocalProtocolError):
            return


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _date() -> tuple[str, str]:
    return ("date", formatdate(usegmt=True))


async def _send_response(io: _Conn, conn: h11.Connection, resp: Response, close: bool) -> None:
    headers = list(resp.headers) + [("content-length", str(len(resp.body))), _date()]
    if close:
        headers.append(("connection", "close"))
    try:
        await io.send(conn, h11.Response(status_code=resp.status, headers=headers,
                                         reason=_reason(resp.status)))
        await io.send(conn, h11.Data(data=resp.body))
        await io.send(conn, h11.EndOfMessage())
    except (ConnectionError, OSError, h11.LocalProtocolError):
        pass  # the peer went away; nothing to answer


async def _send_stream(io: _Conn, conn: h11.Connection, stream: Stream) -> None:
    await io.send(conn, h11.Response(status_code=stream.status, reason=_reason(stream.status),
                                     headers=stream.headers + [("transfer-encoding", "chunked"), _date()]))
    closed = asyncio.ensure_future(io.reader.read(1))  # EOF from the watcher ends the stream
    try:
        it = stream.chunks.__aiter__()
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({nxt, closed}, return_when=asyncio.FIRST_COMPLETED)
            if closed in done:
                nxt.cancel()
                return
            try:
                chunk = nxt.result()
            except StopAsyncIteration:
                await io.send(conn, h11.EndOfMessage())
                return
            await io.send(conn, h11.Data(data=chunk))
    finally:
        closed.cancel()
        aclose = getattr(stream.chunks, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except RuntimeError:
                pass  # generator already running its cancellation


class HTTPError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


class Client:
    """A small HTTP/1.1 client for JSON APIs, with one reusable connection."""

    def __init__(self, host: str, port: int, ssl: ssl_mod.SSLContext | None = None,
                 server_hostname: str | None = None, timeout: float = 5.0) -> None:
        self.host, self.port, self.ssl = host, port, ssl
        self.server_hostname = server_hostname
        self.timeout = timeout
        self._conn: tuple[_Conn, h11.Connection] | None = None
        self._lock = asyncio.Lock()

    async def _open(self) -> tuple[_Conn, h11.Connection]:
        kw: dict[str, Any] = {}
        if self.ssl is not None:
            kw = {"ssl": self.ssl, "server_hostname": self.server_hostname or self.host}
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=READ_SIZE, **kw), self.timeout)
        return _Conn(reader, writer), h11.Connection(h11.CLIENT)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn[0].writer.close()
            self._conn = None

    async def request(self, method: str, path: str, json_body: Any = None,
                      headers: list[tuple[str, str]] | None = None) -> tuple[int, bytes]:
        """Send one request; retries once on a stale pooled connection."""
        async with self._lock:
            for attempt in (0, 1):
                reused = self._conn is not None
                if self._conn is None:
                    self._conn = await self._open()
                try:
                    return await asyncio.wait_for(
                        self._exchange(method, path, json_body, headers), self.timeout)
                except (ConnectionError, OSError, h11.ProtocolError, asyncio.IncompleteReadError):
                    await self.close()
                    if not reused or attempt:
                        raise
                except BaseException:
                    await self.close()
                    raise
            raise AssertionError("unreachable")

    async def json(self, method: str, path: str, json_body: Any = None,
                   headers: list[tuple[str, str]] | None = None) -> Any:
        status, body = await self.request(method, path, json_body, headers)
        if status >= 300:
            raise HTTPError(status, body)
        return json.loads(body) if body else None

    async def _exchange(self, method: str, path: str, json_body: Any,
                        headers: list[tuple[str, str]] | None) -> tuple[int, bytes]:
        assert self._conn is not None
        io, conn = self._conn
        body = b"" if json_body is None else json.dumps(json_body).encode()
        hdrs = [("host", f"{self.host}:{self.port}"), ("content-length", str(len(body)))]
        if json_body is not None:
            hdrs.append(("content-type", "application/json"))
        hdrs += headers or []
        await io.send(conn, h11.Request(method=method, target=path, headers=hdrs))
        await io.send(conn, h11.Data(data=body))
        await io.send(conn, h11.EndOfMessage())
        status = 0
        out = bytearray()
        while True:
            ev = await io.next_event(conn, None)
            if isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                out += ev.data
                if len(out) > 16 * 1024 * 1024:
                    raise h11.RemoteProtocolError("response too large")
            elif isinstance(ev, h11.EndOfMessage):
                break
            elif isinstance(ev, h11.ConnectionClosed):
                raise ConnectionError("connection closed mid-response")
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            await self.close()
        else:
            conn.start_next_cycle()
        return status, bytes(out)

    async def watch(self, path: str, headers: list[tuple[str, str]] | None = None
                    ) -> AsyncIterator[Any]:
        """Open a dedicated connection and yield each NDJSON object of a streamed response."""
        io, conn = await self._open()
        try:
            hdrs = [("host", f"{self.host}:{self.port}")] + (headers or [])
            await io.send(conn, h11.Request(method="GET", target=path, headers=hdrs))
            await io.send(conn, h11.EndOfMessage())
            buf = b""
            while True:
                ev = await io.next_event(conn, None)
                if isinstance(ev, h11.Response):
                    if ev.status_code != 200:
                        body = b""
                        while True:
                            e2 = await io.next_event(conn, self.timeout)
                            if isinstance(e2, h11.Data):
                                body += e2.data
                            else:
                                break
                        raise HTTPError(ev.status_code, body)
                elif isinstance(ev, h11.Data):
                    buf += ev.data
                    if len(buf) > 16 * 1024 * 1024:
                        raise h11.RemoteProtocolError("watch line too long")
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield json.loads(line)
                elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return
        finally:
            io.writer.close()


BACKOFF_MIN, BACKOFF_MAX = 0.1, 3.0   # seconds between watch attempts (jittered, doubling)


async def keep_watching(client_factory: Callable[[], "Client"], path: str,
                        apply: Callable[[Any], None], connected: Callable[[bool], None],
                        refused: Callable[[HTTPError], bool], lost: Callable[[Exception], None]) -> None:
    """Watch ``path`` until cancelled: every snapshot goes to ``apply``. A watch that breaks
    (``lost``) or is refused (``refused``; True stops watching) is opened again after a
    jittered, doubling backoff; ``connected`` tells whether a watch is streaming. Nothing is
    cleared meanwhile: the last snapshot keeps serving."""
    backoff = BACKOFF_MIN
    while True:
        try:
            async for snap in client_factory().watch(path):
                connected(True)
                backoff = BACKOFF_MIN
                apply(snap)
        except asyncio.CancelledError:
            raise
        except HTTPError as e:
            if refused(e):
                return
        except Exception as e:  # noqa: BLE001 - keep the last snapshot and reconnect
            lost(e)
        connected(False)
        await asyncio.sleep(backoff * (0.5 + random.random()))
        backoff = min(backoff * 2, BACKOFF_MAX)
