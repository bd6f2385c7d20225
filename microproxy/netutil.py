"""Socket helpers for transparent interception (Linux).

``original_dst(sock)`` answers "where was this connection going before iptables sent it
to us?": after a nat ``REDIRECT`` (``microproxy init``'s rules send outbound TCP to 4140
and inbound TCP to 4143), the accepted socket's local address is the proxy's own, and
the address the client asked for lives in the conntrack entry, read with
``SO_ORIGINAL_DST`` (IPv4, ``linux/netfilter_ipv4.h``) or ``IP6T_SO_ORIGINAL_DST``
(IPv6, ``linux/netfilter_ipv6/ip6_tables.h``) — both option number 80.

With asyncio (and uvloop) get the socket with ``transport.get_extra_info("socket")``.
"""
from __future__ import annotations

import socket
import struct

SO_ORIGINAL_DST = 80        # level SOL_IP: struct sockaddr_in (16 bytes)
IP6T_SO_ORIGINAL_DST = 80   # level IPPROTO_IPV6: struct sockaddr_in6 (28 bytes)
_SOL_IP = getattr(socket, "SOL_IP", 0)
_SOCKADDR_IN = 16
_SOCKADDR_IN6 = 28


def _from_sockaddr_in(raw: bytes) -> tuple[str, int]:
    (port,) = struct.unpack_from("!H", raw, 2)
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


def _from_sockaddr_in6(raw: bytes) -> tuple[str, int]:
    (port,) = struct.unpack_from("!H", raw, 2)
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """``(host, port)`` the connection on ``sock`` was originally addressed to.

    Raises OSError when there is none (e.g. ENOENT: the connection was not NATed and
    conntrack has no entry for it, or the nf_conntrack module is not loaded). Note a
    connection that reached the listener directly also reports its own destination
    when conntrack tracks it; compare with ``sock.getsockname()`` to tell them apart.
    """
    if sock.family == socket.AF_INET:
        return _from_sockaddr_in(sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN))
    if sock.family == socket.AF_INET6:
        local = sock.getsockname()[0]
        if local.startswith("::ffff:") and "." in local:
            # an IPv4 connection on a dual-stack socket: the IPv4 conntrack entry
            return _from_sockaddr_in(sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN))
        return _from_sockaddr_in6(
            sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6))
    raise OSError(f"SO_ORIGINAL_DST needs an IPv4 or IPv6 socket, not {sock.family!r}")
