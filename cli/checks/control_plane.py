"""Checks of the control plane (category micromesh-control-plane): its processes, its
``/ready`` over HTTPS verified against the trust bundle, and clock skew."""
from __future__ import annotations

import datetime as dt
import http.client
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from identity import ca

from .. import local
from ..check import CheckFailed, Status, error, ok, warn
from .context import CheckContext, span, when

MAX_CLOCK_SKEW = dt.timedelta(seconds=5)


def components(ctx: CheckContext) -> dict[str, local.Component]:
    return ctx.cached("components", lambda: local.read_controlplane(ctx.home))  # type: ignore[no-any-return]


def control_plane_running(ctx: CheckContext) -> Status:
    comps = components(ctx)
    if not comps:
        raise CheckFailed(f"no control plane was ever started in {ctx.home.root}")
    down = [f"{name} is not running" + (f" (it listened on {comps[name].addr})" if name in comps else "")
            for name in local.COMPONENTS if name not in comps or not comps[name].running()]
    return error("\n".join(down)) if down else ok()


class _NamedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an address, verifying the peer as ``server_name`` (a mesh identity)."""

    def __init__(self, host: str, port: int, server_name: str, context: ssl.SSLContext,
                 timeout: float) -> None:
        super().__init__(host, port, context=context, timeout=timeout)
        self.server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.server_name)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Exchange:
    status: int
    body: bytes
    date: str | None                    # the Date header, if the server sent one
    peer_not_before: dt.datetime | None # the server certificate's notBefore
    at: dt.datetime                     # our clock when the answer came


def describe_error(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"its certificate does not verify against the trust anchor: {e.verify_message}"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "no answer in time"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


def https_get(addr: tuple[str, int], server_name: str, context: ssl.SSLContext, path: str,
              timeout: float, now: Callable[[], dt.datetime]) -> Exchange:
    conn = _NamedHTTPS(addr[0], addr[1], server_name, context, timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        peer = conn.sock.getpeercert() if conn.sock is not None else None
        not_before = None
        if peer and peer.get("notBefore"):
            not_before = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(peer["notBefore"]), dt.timezone.utc)
        return Exchange(resp.status, body, resp.getheader("date"), not_before, now())
    finally:
        conn.close()


def component_ready(ctx: CheckContext, name: str) -> Exchange:
    def probe() -> Exchange:
        comp = components(ctx).get(name)
        if comp is None:
            raise CheckFailed(f"{name} has no address in {ctx.rel(ctx.home.controlplane)}")
        cptls = ctx.cached("cptls", lambda: local.ControlPlaneTLS(ctx.home))
        try:
            context = cptls.mutual() if name == "destination" else cptls.server_only()
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckFailed(f"cannot build the CLI's TLS credentials from {ctx.home.root / 'ca'}: {e}") from None
        server_name = ca.identity_name(name, "micromesh", local.TRUST_DOMAIN)
        try:
            ex = https_get((comp.host, comp.port), server_name, context, "/ready", ctx.timeout, ctx.now)
        except (OSError, ssl.SSLError, http.client.HTTPException) as e:
            raise CheckFailed(f"{name} at {comp.addr}: {describe_error(e)}") from None
        if ex.status != 200:
            raise CheckFailed(f"{name} at {comp.addr} answered /ready with {ex.status}: "
                              f"{ex.body[:200].decode('utf-8', 'replace').strip()}")
        return ex
    return ctx.cached(f"ready:{name}", probe)  # type: ignore[no-any-return]


def identity_ready(ctx: CheckContext) -> Status:
    component_ready(ctx, "identity")
    return ok()


def destination_ready(ctx: CheckContext) -> Status:
    component_ready(ctx, "destination")
    return ok()


def skew(local_now: dt.datetime, date_header: str | None, not_before: dt.datetime | None,
         limit: dt.timedelta = MAX_CLOCK_SKEW) -> Status:
    """Compare our clock with the server's: its Date header when it sends one (1 s
    resolution), else only a lower bound, its certificate's notBefore + the skew
    allowance the CA backdates by (our clock cannot be earlier than that)."""
    if date_header:
        try:
            theirs = parsedate_to_datetime(date_header)
        except (TypeError, ValueError):
            return warn(f"cannot parse the control plane's Date header {date_header!r}")
        if theirs.tzinfo is None:
            theirs = theirs.replace(tzinfo=dt.timezone.utc)
        delta = local_now - theirs
        if abs(delta) > limit + dt.timedelta(seconds=1):
            side = "ahead of" if delta > dt.timedelta(0) else "behind"
            return warn(f"this clock is {span(delta)} {side} the control plane's ({when(local_now)} here, "
                        f"{when(theirs)} there)")
        return ok()
    if not_before is not None:
        earliest = not_before + ca.CLOCK_SKEW
        if local_now < earliest - limit:
            return warn(f"this clock is at least {span(earliest - local_now)} behind the control plane's "
                        f"(its certificate was issued at {when(earliest)}, it is {when(local_now)} here)")
    return ok()


def clock_skew(ctx: CheckContext) -> Status:
    ex = component_ready(ctx, "identity")
    return skew(ex.at, ex.date, ex.peer_not_before)
