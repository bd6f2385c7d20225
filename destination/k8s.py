"""Kubernetes objects -> ``/v1/endpoints`` snapshots, without I/O (the watcher is k8s_watch.py).

Theory of operation
-------------------
- The store keeps a small *view* of each Service, EndpointSlice, Pod and Namespace it is
  given (only the fields discovery reads), keyed by namespace/name. Watch events
  (``apply``) and full lists (``replace``) update the views; each returns the set of
  service keys (``"name.ns"``, as registry.py's) whose snapshot may have changed, which
  the server fans out to its watchers. An event whose view equals the old one (a pod's
  status heartbeat, a slice's unrelated label) changes nothing and reports nothing.
- Which services a change touches: a Service itself; an EndpointSlice its
  ``kubernetes.io/service-name`` (old and new); a Pod every service whose slices point at
  it (``targetRef``); a Namespace every service in it (namespace annotations feed the
  opaque-port defaults).
- Versions work as in registry.py: one store-wide counter, bumped once per change; each
  touched service takes it. Unknown services report the current counter.
- ``resourceVersion`` is tracked per kind: a list sets it, every event carries its
  object's, a BOOKMARK moves only it. An ERROR event raises ``Gone`` (code 410: the
  watcher must re-list) or ``WatchError`` (anything else). resourceVersions are opaque
  strings: never compared, only handed back to the API server.

A snapshot of ``NAME.NS.svc.<cluster-domain>:PORT`` (or ``NAME.NS:PORT``):
- no such Service, an ExternalName one, or no TCP port PORT on it -> ``exists: false``
  (Linkerd would fall back to PORT as a target port; we keep registry.py's rule that only a
  service's own ports exist);
- else ``exists: true`` and the endpoints: every *ready* endpoint (``conditions.ready``
  true or absent; terminating ones are not ready) of the service's slices whose
  ``addressType`` is the service's primary IP family, deduplicated by address, at
  ``ADDRESS:PORT`` where PORT is the slice port with the service port's name (the
  EndpointSlice controller has already resolved named ``targetPort``s per pod);
- an endpoint whose ``targetRef`` pod is not (yet) known is left out, as Linkerd does,
  rather than sent without its identity; endpoints without a targetRef (manually managed
  slices) are plaintext;
- identity ``<serviceAccountName>.<ns>.serviceaccount.identity.<trust-domain>`` only for
  pods meshed by this control plane (``meshed()``); otherwise ``identity: null`` and
  ``protocol_hint: null`` (plaintext, no hint — as Linkerd sends nothing for unmeshed
  pods). Meshed endpoints get ``opaque`` when the port is opaque, else ``http/1``;
- labels: ``workload`` (a Deployment's name from its ReplicaSet's pod-template-hash
  naming, else the controller's name, else the ``app.kubernetes.io/name``/``app``
  label, else the pod), ``workload_kind``, ``namespace``, ``pod``, ``service_account``,
  and ``zone`` when the slice says.

The views of API objects and the meshed/workload/opaque rules are in k8s_objects.py; the
list+watch client that feeds this store is k8s_watch.py.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from identity import ca

from .k8s_objects import (CONTROL_PLANE_NS_LABEL, DEFAULT_CONTROL_PLANE_NS, INJECT_ANNOTATION,
                          OPAQUE_PORTS_ANNOTATION, PROXY_CONTAINER, SERVICE_NAME_LABEL,
                          TRUST_ROOT_ANNOTATION, NamespaceView, PodView, ServicePort, ServiceView,
                          Settings, SliceEndpoint, SlicePort, SliceView, meshed, namespace_view,
                          object_meta, parse_port_list, pod_view, service_view, slice_view, workload_of)
from .registry import ENDPOINT_WEIGHT, PROTOCOL_HINT, Target, canonical_authority, parse_authority

log = logging.getLogger(__name__)

__all__ = [  # the views and rules live in k8s_objects.py; re-exported for one import
    "CONTROL_PLANE_NS_LABEL", "DEFAULT_CONTROL_PLANE_NS", "DEFAULT_OPAQUE_PORTS", "INJECT_ANNOTATION",
    "KINDS", "OPAQUE_PORTS_ANNOTATION", "PROXY_CONTAINER", "SERVICE_NAME_LABEL", "TRUST_ROOT_ANNOTATION",
    "Gone", "NamespaceView", "PodView", "ServicePort", "ServiceView", "Settings", "SliceEndpoint",
    "SlicePort", "SliceView", "Store", "WatchError", "meshed", "namespace_view", "parse_port_list",
    "pod_view", "service_view", "slice_view", "watch_event", "workload_of",
]

KINDS = ("Namespace", "Service", "EndpointSlice", "Pod")
# Linkerd's default opaque ports (REFERENCE-linkerd §1): server-speaks-first protocols.
DEFAULT_OPAQUE_PORTS = frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})
HTTP_APP_PROTOCOLS = frozenset({"http", "kubernetes.io/h2c"})
OPAQUE_HINT = "opaque"


class Gone(Exception):
    """The watch's resourceVersion is too old (410): re-list, then watch again."""


class WatchError(Exception):
    """An ERROR watch event other than 410."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(f"watch error {code}: {message}")
        self.code = code


def watch_event(event: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A watch event's type and object. Raises Gone / WatchError for ERROR events,
    ValueError for an event without an object."""
    etype = event.get("type")
    obj = event.get("object")
    if not isinstance(obj, dict):
        raise ValueError(f"watch event without an object: {str(event)[:200]}")
    if etype == "ERROR":
        code = obj.get("code") if isinstance(obj.get("code"), int) else None
        message = str(obj.get("message") or obj.get("reason") or "")
        if code == 410 or obj.get("reason") in ("Expired", "Gone"):
            raise Gone(message)
        raise WatchError(code, message)
    return etype, obj


# === The store ===

_Key = tuple[str, str]  # (namespace, name)


def _key_of(obj: Mapping[str, Any]) -> _Key:
    meta = object_meta(obj)
    return str(meta.get("namespace") or ""), meta["name"]


@dataclass(slots=True)
class Store:
    """The cluster as discovery sees it. Not thread-safe; one event loop drives it."""

    settings: Settings = field(default_factory=Settings)
    version: int = 0
    resource_versions: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(KINDS))
    _services: dict[_Key, ServiceView] = field(default_factory=dict)
    _slices: dict[_Key, SliceView] = field(default_factory=dict)
    _slices_of: dict[str, set[_Key]] = field(default_factory=dict)          # service key -> slices
    _pod_refs: dict[_Key, set[_Key]] = field(default_factory=dict)          # pod -> slices naming it
    _pods: dict[_Key, PodView] = field(default_factory=dict)
    _namespaces: dict[str, NamespaceView] = field(default_factory=dict)
    _versions: dict[str, int] = field(default_factory=dict)

    @property
    def trust_domain(self) -> str:
        return self.settings.trust_domain

    # --- changes

    def apply(self, kind: str, event: Mapping[str, Any]) -> frozenset[str]:
        """One watch event. Raises Gone / WatchError for ERROR events, ValueError for
        events that are not watch events."""
        etype, obj = watch_event(event)
        self._check_kind(kind)
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if etype == "BOOKMARK":
            changed: frozenset[str] = frozenset()
        elif etype in ("ADDED", "MODIFIED"):
            changed = self._set(kind, obj)
        elif etype == "DELETED":
            changed = self._delete(kind, _key_of(obj))
        else:
            raise ValueError(f"unknown watch event type {etype!r}")
        if isinstance(rv, str) and rv:
            self.resource_versions[kind] = rv
        return self._bump(changed)

    def replace(self, kind: str, items: Iterable[Mapping[str, Any]],
                resource_version: str | None) -> frozenset[str]:
        """A full list of ``kind`` (initial or after 410): what is absent is deleted."""
        self._check_kind(kind)
        changed: set[str] = set()
        seen: set[_Key] = set()
        for obj in items:
            try:
                key = _key_of(obj)
            except ValueError as e:
                log.warning("skipping a listed %s: %s", kind, e)
                continue
            seen.add(key)
            changed |= self._set(kind, obj)
        for key in [k for k in self._known(kind) if k not in seen]:
            changed |= self._delete(kind, key)
        self.resource_versions[kind] = resource_version
        return self._bump(changed)

    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")

    def _known(self, kind: str) -> list[_Key]:
        if kind == "Namespace":
            return [("", name) for name in self._namespaces]
        if kind == "Service":
            return list(self._services)
        if kind == "EndpointSlice":
            return list(self._slices)
        return list(self._pods)

    def _bump(self, keys: Iterable[str]) -> frozenset[str]:
        keys = frozenset(keys)
        if keys:
            self.version += 1
            for key in keys:
                self._versions[key] = self.version
        return keys

    def _set(self, kind: str, obj: Mapping[str, Any]) -> frozenset[str]:
        try:
            if kind == "Service":
                return self._set_service(service_view(obj))
            if kind == "EndpointSlice":
                return self._set_slice(slice_view(obj))
            if kind == "Pod":
                return self._set_pod(pod_view(obj, self.settings))
            return self._set_namespace(namespace_view(obj))
        except (ValueError, TypeError, AttributeError) as e:
            log.warning("ignoring a malformed %s: %s", kind, e)
            return frozenset()

    def _delete(self, kind: str, key: _Key) -> frozenset[str]:
        if kind == "Service":
            svc = self._services.pop(key, None)
            return frozenset({svc.key}) if svc else frozenset()
        if kind == "EndpointSlice":
            old = self._slices.pop(key, None)
            if old is None:
                return frozenset()
            self._unindex(old)
            return frozenset({old.service}) if old.service else frozenset()
        if kind == "Pod":
            return self._services_of_pod(key) if self._pods.pop(key, None) else frozenset()
        ns = self._namespaces.pop(key[1], None)
        return self._services_in(key[1]) if ns else frozenset()

    def _set_service(self, new: ServiceView) -> frozenset[str]:
        key = (new.namespace, new.name)
        if self._services.get(key) == new:
            return frozenset()
        self._services[key] = new
        return frozenset({new.key})

    def _set_slice(self, new: SliceView) -> frozenset[str]:
        key = (new.namespace, new.name)
        old = self._slices.get(key)
        if old == new:
            return frozenset()
        if old is not None:
            self._unindex(old)
        self._slices[key] = new
        if new.service:
            self._slices_of.setdefault(new.service, set()).add(key)
        for ep in new.endpoints:
            if ep.pod:
                self._pod_refs.setdefault((new.namespace, ep.pod), set()).add(key)
        return frozenset(s for s in (old.service if old else None, new.service) if s)

    def _unindex(self, old: SliceView) -> None:
        key = (old.namespace, old.name)
        if old.service:
            slices = self._slices_of.get(old.service)
            if slices is not None:
                slices.discard(key)
                if not slices:
                    del self._slices_of[old.service]
        for ep in old.endpoints:
            if ep.pod:
                refs = self._pod_refs.get((old.namespace, ep.pod))
                if refs is not None:
                    refs.discard(key)
                    if not refs:
                        del self._pod_refs[(old.namespace, ep.pod)]

    def _set_pod(self, new: PodView) -> frozenset[str]:
        key = (new.namespace, new.name)
        if self._pods.get(key) == new:
            return frozenset()
        self._pods[key] = new
        return self._services_of_pod(key)

    def _services_of_pod(self, key: _Key) -> frozenset[str]:
        return frozenset(s for sk in self._pod_refs.get(key, ())
                         if (s := self._slices[sk].service) is not None)

    def _set_namespace(self, new: NamespaceView) -> frozenset[str]:
        if self._namespaces.get(new.name) == new:
            return frozenset()
        self._namespaces[new.name] = new
        return self._services_in(new.name)

    def _services_in(self, namespace: str) -> frozenset[str]:
        keys = {svc.key for (ns, _), svc in self._services.items() if ns == namespace}
        keys |= {s for s in self._slices_of if s.split(".", 1)[1] == namespace}
        return frozenset(keys)

    # --- reading

    def parse(self, authority: str, namespace: str | None = None) -> Target:
        return parse_authority(authority, namespace, self.settings.cluster_domain)

    def watch_key(self, target: Target) -> str:
        """The key whose changes wake a watcher of ``target``."""
        return target.key or f"@{target.host}"

    def service_keys(self) -> list[str]:
        return sorted(svc.key for svc in self._services.values())

    def snapshot(self, target: Target) -> dict[str, Any]:
        """The ``/v1/endpoints`` answer for ``target`` (the same shape as Registry's)."""
        svc = None
        if target.name is not None and target.namespace is not None:
            svc = self._services.get((target.namespace, target.name))
        port = svc.tcp_port(target.port) if svc is not None and svc.type != "ExternalName" else None
        key = target.key
        return {
            "version": self._versions.get(key, self.version) if svc is not None and key else self.version,
            "authority": canonical_authority(target, self.settings.cluster_domain),
            "service": key,
            "port": target.port,
            "exists": port is not None,
            "endpoints": self._endpoints(svc, port) if svc is not None and port is not None else [],
        }

    def _endpoints(self, svc: ServiceView, port: ServicePort) -> list[dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for sk in sorted(self._slices_of.get(svc.key, ())):
            sl = self._slices[sk]
            if sl.address_type != svc.ip_family:
                continue
            sp = sl.port_named(port.name)
            if sp is None:
                continue
            for ep in sl.endpoints:
                if not ep.ready:
                    continue
                host = f"[{ep.address}]" if ":" in ep.address else ep.address
                address = f"{host}:{sp.port}"
                if address in out:
                    continue
                entry = self._endpoint(svc, port, sp, ep, address)
                if entry is not None:
                    out[address] = entry
        return [out[a] for a in sorted(out)]

    def _endpoint(self, svc: ServiceView, port: ServicePort, sp: SlicePort, ep: SliceEndpoint,
                  address: str) -> dict[str, Any] | None:
        labels: dict[str, str] = {"namespace": svc.namespace}
        if ep.zone:
            labels["zone"] = ep.zone
        pod = self._pods.get((svc.namespace, ep.pod)) if ep.pod else None
        if pod is None:
            if ep.has_target:
                return None  # its pod is not known yet: wait for it rather than drop its identity
            return {"address": address, "weight": ENDPOINT_WEIGHT, "identity": None,
                    "protocol_hint": None, "labels": labels}
        labels.update(workload=pod.workload, workload_kind=pod.workload_kind, pod=pod.name,
                      service_account=pod.service_account)
        identity = hint = None
        if pod.meshed:
            identity = ca.identity_name(pod.service_account, pod.namespace, self.settings.trust_domain)
            hint = OPAQUE_HINT if self._opaque(svc, port, sp, pod) else PROTOCOL_HINT
        return {"address": address, "weight": ENDPOINT_WEIGHT, "identity": identity,
                "protocol_hint": hint, "labels": labels}

    def _opaque(self, svc: ServiceView, port: ServicePort, sp: SlicePort, pod: PodView) -> bool:
        app = sp.app_protocol or port.app_protocol
        if app is not None:
            return app not in HTTP_APP_PROTOCOLS  # Linkerd: any other appProtocol is opaque
        if svc.opaque_ports is not None and port.port in svc.opaque_ports:
            return True
        ns = self._namespaces.get(pod.namespace)
        ports = pod.opaque_ports
        if ports is None:
            ports = ns.opaque_ports if ns is not None and ns.opaque_ports is not None else DEFAULT_OPAQUE_PORTS
        return sp.port in ports
