"""Destination's endpoint table, without I/O: no asyncio, no clock (``now`` is passed in).

Theory of operation
-------------------
- A *workload* (one replica, keyed by its ``instance`` id) registers the address of its
  proxy's inbound listener under a *service* ``name.namespace``, with a lease that expires
  at ``now + ttl``. Re-registering the same instance with the same data only renews the
  lease (no change, no new version). An instance belongs to the identity that first
  registered it: nobody else may re-register or deregister it.
- A replica may name a shared ``service`` (``mesh run --service``, like a Kubernetes Service
  selecting several workloads); it is then an endpoint of that service *and* of its own
  workload name (both resolvable; the endpoint's ``workload`` label stays its own name).
  Without ``service`` the two are the same.
- A service's port is fixed by the first registration that finds it without endpoints
  (``service_port`` or, when null, ``app_port``). Later replicas join with that same port
  whatever they ask for. A service whose last endpoint went away stays known
  (``exists: true``, no endpoints) — "no endpoints right now" is different from
  "no such service".
- Every change (register, deregister, expiry) bumps one registry-wide counter; each
  service it touched takes the new value as its version. So versions only grow, also
  across restarts, since the counter is persisted with the table (``to_dict``).
  A snapshot of an unknown service carries the current counter, so when the service
  appears later its version is higher still.
- Every mutation returns the set of service keys (``"name.ns"``) it changed; the server
  fans those out to watchers and persists the table when the set is non-empty.

Authorities (``HOST[:PORT]``, case-insensitive, trailing dot allowed, port 80 when
absent): ``name.ns``, ``name.ns.svc``, ``name.ns.svc.<trust-domain>``, or a bare ``name``
when the caller names the namespace. Any other well-formed host is simply not a mesh
service (``exists: false``); malformed text raises ``AuthorityError``.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from identity import ca
from identity.tokens import valid_name

DEFAULT_PORT = 80
ENDPOINT_WEIGHT = 10000
PROTOCOL_HINT = "http/1"
STATE_FORMAT = 1
VIP_NETWORK = ipaddress.ip_network("10.96.0.0/16")   # service virtual IPs (like ClusterIPs)

_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_IPV6 = re.compile(r"^\[[0-9a-f:.]+\]$")
_INSTANCE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")


class AuthorityError(ValueError):
    """The authority is not HOST[:PORT] (maps to 400)."""


class RegistryError(ValueError):
    """A request the registry refuses; ``status`` is the HTTP status it maps to."""

    status = 400


class Forbidden(RegistryError):
    status = 403


class NotFound(RegistryError):
    status = 404


# === Authorities ===

@dataclass(frozen=True, slots=True)
class Target:
    """What a lookup asks for: a normalised host and port, and the mesh service if any."""

    host: str
    port: int
    name: str | None = None
    namespace: str | None = None

    @property
    def key(self) -> str | None:
        return f"{self.name}.{self.namespace}" if self.name is not None else None


def _port(text: str, what: str) -> int:
    if not text.isdigit() or len(text) > 5 or not 1 <= int(text) <= 65535:
        raise AuthorityError(f"bad {what} port {text!r}")
    return int(text)


def parse_authority(authority: str, namespace: str | None = None,
                    trust_domain: str = ca.DEFAULT_TRUST_DOMAIN) -> Target:
    text = authority.strip().lower()
    if not text:
        raise AuthorityError("empty authority")
    if text.startswith("["):  # [v6]:port — well-formed, never a mesh service
        host, bracket, rest = text.partition("]")
        host += bracket
        if not bracket or not _IPV6.match(host) or (rest and not rest.startswith(":")):
            raise AuthorityError(f"bad authority {authority!r}")
        port = _port(rest[1:], "authority") if rest else DEFAULT_PORT
        return Target(host, port)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, ""
    port = _port(port_text, "authority") if sep else DEFAULT_PORT
    host = host[:-1] if host.endswith(".") else host
    if not host or len(host) > 253 or not _HOSTNAME.match(host):
        raise AuthorityError(f"bad authority host {authority!r}")
    labels = host.split(".")
    if len(labels) == 1:
        if namespace is None:
            raise AuthorityError(f"bare name {host!r} needs a namespace parameter")
        ns = namespace.strip().lower()
        if not valid_name(ns):
            raise AuthorityError(f"bad namespace {namespace!r}")
        return Target(f"{host}.{ns}", port, host, ns) if valid_name(host) else Target(host, port)
    name, ns, suffix = labels[0], labels[1], labels[2:]
    in_mesh = (not suffix or suffix == ["svc"]
               or (suffix[0] == "svc" and ".".join(suffix[1:]) == trust_domain))
    if in_mesh and valid_name(name) and valid_name(ns):
        return Target(host, port, name, ns)
    return Target(host, port)


def canonical_authority(target: Target, trust_domain: str) -> str:
    if target.key is None:
        host = target.host
    else:
        host = f"{target.name}.{target.namespace}.svc.{trust_domain}"
    return f"{host}:{target.port}"


def _is_vip(text: str) -> bool:
    try:
        return ipaddress.ip_address(text) in VIP_NETWORK
    except ValueError:
        return False


# === Registrations ===

def _field(obj: dict[str, Any], name: str, kind: type, optional: bool = False) -> Any:
    value = obj.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RegistryError(f"field {name!r} must be a {kind.__name__}")
    return value


def _valid_port(obj: dict[str, Any], name: str, optional: bool = False) -> int | None:
    value = _field(obj, name, int, optional)
    if value is not None and not 1 <= value <= 65535:
        raise RegistryError(f"field {name!r} must be a port in 1..65535")
    return value


def _valid_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or len(port) > 5 or not 1 <= int(port) <= 65535:
        raise RegistryError("field 'address' must be HOST:PORT with a port in 1..65535")
    bare = host.lower()
    if not (_HOSTNAME.match(bare) or _IPV6.match(bare)) or len(bare) > 253:
        raise RegistryError("field 'address' has a bad host")
    return address


@dataclass(frozen=True, slots=True)
class Registration:
    """One replica as it registered itself (``POST /v1/register``)."""

    instance: str
    name: str
    namespace: str
    identity: str
    address: str
    app_port: int
    service_port: int | None
    service_account: str
    service_name: str = ""    # the shared service (``mesh run --service``); "" = the name

    @property
    def service(self) -> str:
        """The key of the service this replica registers under (``"name.ns"``)."""
        return f"{self.service_name or self.name}.{self.namespace}"

    @property
    def services(self) -> tuple[str, ...]:
        """Every service key the replica is an endpoint of: the shared service and, when it
        differs, the workload's own name (so ``books-v1.ns`` stays resolvable too)."""
        own = f"{self.name}.{self.namespace}"
        return (self.service,) if self.service == own else (self.service, own)

    @classmethod
    def from_json(cls, obj: Any, trust_domain: str = ca.DEFAULT_TRUST_DOMAIN) -> "Registration":
        """Validate a request body. Raises RegistryError (400) naming the bad field, or
        Forbidden (403) when the identity is not the service account's in that namespace."""
        if not isinstance(obj, dict):
            raise RegistryError("body must be a JSON object")
        name = _field(obj, "name", str)
        namespace = _field(obj, "namespace", str)
        identity = _field(obj, "identity", str)
        instance = _field(obj, "instance", str)
        address = _valid_address(_field(obj, "address", str))
        app_port = _valid_port(obj, "app_port")
        service_port = _valid_port(obj, "service_port", optional=True)
        for key, value in (("name", name), ("namespace", namespace)):
            if not valid_name(value):
                raise RegistryError(f"field {key!r} must be a DNS-1123 label")
        if not _INSTANCE.match(instance):
            raise RegistryError("field 'instance' must be 1-253 characters of [A-Za-z0-9._-]")
        try:
            sa, id_ns, id_td = ca.parse_identity(identity)
        except ValueError:
            raise RegistryError("field 'identity' is not a mesh identity") from None
        service_account = _field(obj, "service_account", str, optional=True) or sa
        service_name = _field(obj, "service", str, optional=True) or name
        if not valid_name(service_name):
            raise RegistryError("field 'service' must be a DNS-1123 label")
        if not valid_name(service_account):
            raise RegistryError("field 'service_account' must be a DNS-1123 label")
        if (sa, id_ns, id_td) != (service_account, namespace, trust_domain):
            raise Forbidden(f"identity {identity!r} is not service account {service_account!r} "
                            f"of namespace {namespace!r} in trust domain {trust_domain!r}")
        assert app_port is not None
        return cls(instance, name, namespace, identity, address, app_port, service_port,
                   service_account, "" if service_name == name else service_name)

    def to_json(self) -> dict[str, Any]:
        return {"instance": self.instance, "name": self.name, "namespace": self.namespace,
                "identity": self.identity, "address": self.address, "app_port": self.app_port,
                "service_port": self.service_port, "service_account": self.service_account,
                **({"service": self.service_name} if self.service_name else {})}


@dataclass(frozen=True, slots=True)
class Registered:
    service: str
    port: int
    changed: frozenset[str]


@dataclass(slots=True)
class _Lease:
    reg: Registration
    expires: float


@dataclass(slots=True)
class _Service:
    name: str
    namespace: str
    port: int
    version: int
    instances: set[str] = field(default_factory=set)


# === The table ===

class Registry:
    def __init__(self, trust_domain: str = ca.DEFAULT_TRUST_DOMAIN, version: int = 0) -> None:
        self.trust_domain = trust_domain
        self.version = version
        self._services: dict[str, _Service] = {}
        self._leases: dict[str, _Lease] = {}
        self._vips: dict[str, str] = {}        # service key -> virtual IP (stable, never reused)
        self._vip_owner: dict[str, str] = {}   # virtual IP -> service key

    def __len__(self) -> int:
        return len(self._leases)

    def _bump(self, keys: set[str]) -> frozenset[str]:
        if keys:
            self.version += 1
            for key in keys:
                self._services[key].version = self.version
        return frozenset(keys)

    def _drop(self, instance: str) -> set[str]:
        lease = self._leases.pop(instance)
        for key in lease.reg.services:
            self._services[key].instances.discard(instance)
        return set(lease.reg.services)

    def _join(self, reg: Registration, key: str, name: str) -> _Service:
        want = reg.service_port or reg.app_port
        svc = self._services.get(key)
        if svc is None:
            svc = self._services[key] = _Service(name, reg.namespace, want, self.version)
            self._assign_vip(key)
        elif not svc.instances:
            svc.port = want  # no live endpoints: this registration fixes the port afresh
        svc.instances.add(reg.instance)
        return svc

    def service_of(self, instance: str) -> str | None:
        lease = self._leases.get(instance)
        return lease.reg.service if lease is not None else None

    def register(self, reg: Registration, now: float, ttl: float) -> Registered:
        """Add a replica, or renew its lease. Raises Forbidden if another identity owns it."""
        old = self._leases.get(reg.instance)
        if old is not None and old.reg.identity != reg.identity:
            raise Forbidden(f"instance {reg.instance!r} belongs to another identity")
        if old is not None and old.reg == reg:
            old.expires = max(old.expires, now + ttl)
            return Registered(reg.service, self._services[reg.service].port, frozenset())
        changed: set[str] = set()
        if old is not None:
            changed |= self._drop(reg.instance)
        svc = self._join(reg, reg.service, reg.service_name or reg.name)
        if len(reg.services) > 1:   # also an endpoint of the workload's own name
            self._join(reg, reg.services[1], reg.name)
        self._leases[reg.instance] = _Lease(reg, now + ttl)
        changed.update(reg.services)
        return Registered(reg.service, svc.port, self._bump(changed))

    def deregister(self, instance: str, identity: str | None) -> frozenset[str]:
        """Drop a replica at once. ``identity`` (the caller) must own it; None skips the check."""
        lease = self._leases.get(instance)
        if lease is None:
            raise NotFound(f"no instance {instance!r}")
        if identity is not None and lease.reg.identity != identity:
            raise Forbidden(f"instance {instance!r} belongs to another identity")
        return self._bump(self._drop(instance))

    def expire(self, now: float) -> frozenset[str]:
        """Drop every replica whose lease ran out by ``now``."""
        gone = [i for i, lease in self._leases.items() if lease.expires <= now]
        return self._bump(set().union(*(self._drop(i) for i in gone)))

    def next_expiry(self) -> float | None:
        return min((lease.expires for lease in self._leases.values()), default=None)

    # --- service virtual IPs (`mesh run --netns`: names resolve to these, like ClusterIPs)

    def _assign_vip(self, key: str, vip: str | None = None) -> str:
        """The service's virtual IP: ``vip`` when given and free, else the lowest free one
        in VIP_NETWORK. A VIP stays its service's for the life of the (persisted) table."""
        have = self._vips.get(key)
        if have is not None:
            return have
        if vip is None or vip in self._vip_owner:
            base = int(VIP_NETWORK.network_address)
            vip = next(str(ipaddress.ip_address(base + i)) for i in range(1, VIP_NETWORK.num_addresses - 1)
                       if str(ipaddress.ip_address(base + i)) not in self._vip_owner)
        self._vips[key] = vip
        self._vip_owner[vip] = key
        return vip

    def vip(self, key: str) -> str | None:
        return self._vips.get(key)

    def services(self) -> list[dict[str, Any]]:
        """Every known service with its port and virtual IP (``GET /v1/services``)."""
        return [{"service": key, "name": s.name, "namespace": s.namespace, "port": s.port,
                 "vip": self._vips.get(key), "endpoints": len(s.instances)}
                for key, s in sorted(self._services.items())]

    def _pod_leases(self, host: str, port: int) -> list[Registration]:
        """Registrations whose proxy address is the (non-loopback) IP ``host`` and whose app
        or service port is ``port``: an app calling a pod IP directly (`mesh run --netns`)."""
        if host.startswith("127.") or host in ("localhost", "[::1]"):
            return []
        out = []
        for instance in sorted(self._leases):
            reg = self._leases[instance].reg
            if reg.address.rpartition(":")[0] == host and port in (reg.app_port, reg.service_port):
                out.append(reg)
        return out

    def watch_key(self, target: Target) -> str:
        """The key whose changes wake a watcher of ``target``."""
        if target.key is not None:
            return target.key
        pods = self._pod_leases(target.host, target.port)
        return pods[0].service if pods else f"@{target.host}"

    # --- reading

    def parse(self, authority: str, namespace: str | None = None) -> Target:
        target = parse_authority(authority, namespace, self.trust_domain)
        owner = self._vip_owner.get(target.host) if target.key is None else None
        if owner is not None:   # a service's virtual IP: that service
            svc = self._services[owner]
            return Target(target.host, target.port, svc.name, svc.namespace)
        return target

    def snapshot(self, target: Target) -> dict[str, Any]:
        key = target.key
        svc = self._services.get(key) if key is not None else None
        exists = svc is not None and svc.port == target.port
        endpoints = []
        regs: list[Registration] = []
        if exists:
            assert svc is not None
            regs = [self._leases[instance].reg for instance in sorted(svc.instances)]
        elif key is None:
            regs = self._pod_leases(target.host, target.port)
            if regs:   # a pod IP: that pod's proxy, with its identity
                exists = True
                svc = self._services.get(regs[0].service)
        if regs:
            for reg in regs:
                endpoints.append({
                    "address": reg.address,
                    "weight": ENDPOINT_WEIGHT,
                    "identity": reg.identity,
                    "protocol_hint": PROTOCOL_HINT,
                    "labels": {"workload": reg.name, "namespace": reg.namespace,
                               "pod": reg.instance, "service_account": reg.service_account},
                })
        snap = {
            "version": svc.version if svc is not None else self.version,
            "authority": canonical_authority(target, self.trust_domain),
            "service": key,
            "port": target.port,
            "exists": exists,
            "endpoints": endpoints,
        }
        vip = self._vips.get(key) if key is not None else None
        if vip is not None:
            snap["vip"] = vip
        return snap

    def workloads(self, now: float) -> list[dict[str, Any]]:
        out = []
        for instance in sorted(self._leases):
            lease = self._leases[instance]
            item = lease.reg.to_json()
            item["service"] = lease.reg.service
            item["port"] = self._services[lease.reg.service].port
            item["lease_expires_in"] = round(lease.expires - now, 3)
            out.append(item)
        return out

    # --- persistence

    def to_dict(self) -> dict[str, Any]:
        """The table without lease times (they mean nothing to another process)."""
        return {
            "format": STATE_FORMAT,
            "trust_domain": self.trust_domain,
            "version": self.version,
            "services": [{"name": s.name, "namespace": s.namespace, "port": s.port,
                          "version": s.version}
                         for _, s in sorted(self._services.items())],
            "workloads": [self._leases[i].reg.to_json() for i in sorted(self._leases)],
            "vips": dict(sorted(self._vips.items())),
        }

    @classmethod
    def from_dict(cls, data: Any, now: float, lease: float,
                  trust_domain: str = ca.DEFAULT_TRUST_DOMAIN) -> "Registry":
        """Load a saved table; every lease runs until ``now + lease``. Raises ValueError."""
        try:
            if data.get("format") != STATE_FORMAT:
                raise ValueError(f"unknown state format {data.get('format')!r}")
            reg = cls(trust_domain, int(data["version"]))
            for s in data["services"]:
                name, ns, port, version = str(s["name"]), str(s["namespace"]), int(s["port"]), int(s["version"])
                if not (valid_name(name) and valid_name(ns) and 1 <= port <= 65535):
                    raise ValueError(f"bad service {s!r}")
                reg._services[f"{name}.{ns}"] = _Service(name, ns, port, min(version, reg.version))
            for w in data["workloads"]:
                r = Registration.from_json(w, trust_domain)
                for key, name in zip(r.services, (r.service_name or r.name, r.name)):
                    svc = reg._services.get(key)
                    if svc is None:
                        svc = reg._services[key] = _Service(
                            name, r.namespace, r.service_port or r.app_port, reg.version)
                    svc.instances.add(r.instance)
                reg._leases[r.instance] = _Lease(r, now + lease)
            vips = data.get("vips") or {}
            saved = {k: v for k, v in vips.items() if k in reg._services and isinstance(v, str) and _is_vip(v)}
            for key in sorted(saved):           # saved VIPs first: they stay their services'
                reg._assign_vip(key, saved[key])
            for key in sorted(reg._services):   # then services from an older state file
                reg._assign_vip(key)
        except (AttributeError, KeyError, TypeError) as e:
            raise ValueError(f"malformed registry state: {e!r}") from None
        return reg
