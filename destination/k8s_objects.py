"""Views of Kubernetes API objects: only the fields discovery reads (k8s.py's store keeps
these, not whole objects), and the rules read from them: is a pod meshed by this control
plane (``meshed``), which workload runs it (``workload_of``), which ports are opaque
(``config.micromesh.io/opaque-ports``). Pure; tolerant of the fields the API omits when
empty. A view is a frozen dataclass, so "did this event change anything discovery
cares about?" is ``old == new``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from identity import ca

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
INJECT_ANNOTATION = "micromesh.io/inject"
CONTROL_PLANE_NS_LABEL = "micromesh.io/control-plane-ns"
TRUST_ROOT_ANNOTATION = "micromesh.io/trust-root-sha256"
OPAQUE_PORTS_ANNOTATION = "config.micromesh.io/opaque-ports"
PROXY_CONTAINER = "micromesh-proxy"          # the injector's names (destination/inject.py)
DEFAULT_CONTROL_PLANE_NS = "micromesh"


@dataclass(frozen=True, slots=True)
class Settings:
    trust_domain: str = ca.DEFAULT_TRUST_DOMAIN      # identities
    cluster_domain: str = "cluster.local"            # service DNS names
    control_plane_namespace: str = DEFAULT_CONTROL_PLANE_NS
    # when set, a pod whose micromesh.io/trust-root-sha256 annotation differs is not ours
    trust_root_sha256: str | None = None


def object_meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """``metadata``; raises ValueError without a name."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise ValueError("object without metadata.name")
    return meta


def _str_map(value: Any) -> dict[str, str]:
    return {k: v for k, v in value.items() if isinstance(v, str)} if isinstance(value, dict) else {}


def parse_port_list(text: str) -> frozenset[int]:
    """``"25,587,4000-4010"`` -> ports. Raises ValueError."""
    out: set[int] = set()
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        lo, dash, hi = item.partition("-")
        first, last = int(lo), int(hi) if dash else int(lo)
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"bad port {item!r}")
        out.update(range(first, last + 1))
    return frozenset(out)


def _opaque_annotation(annotations: Mapping[str, str], where: str) -> frozenset[int] | None:
    text = annotations.get(OPAQUE_PORTS_ANNOTATION)
    if text is None:
        return None
    try:
        return parse_port_list(text)
    except ValueError as e:
        log.warning("ignoring %s on %s: %s", OPAQUE_PORTS_ANNOTATION, where, e)
        return None


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    protocol: str
    app_protocol: str | None


@dataclass(frozen=True, slots=True)
class ServiceView:
    namespace: str
    name: str
    type: str
    ip_family: str                 # "IPv4" | "IPv6": the slices whose addresses we use
    ports: tuple[ServicePort, ...]
    opaque_ports: frozenset[int] | None

    @property
    def key(self) -> str:
        return f"{self.name}.{self.namespace}"

    def tcp_port(self, port: int) -> ServicePort | None:
        return next((p for p in self.ports if p.port == port and p.protocol == "TCP"), None)


def service_view(obj: Mapping[str, Any]) -> ServiceView:
    meta = object_meta(obj)
    spec = obj.get("spec") or {}
    ports = []
    for p in spec.get("ports") or []:
        if isinstance(p, dict) and isinstance(p.get("port"), int):
            ports.append(ServicePort(str(p.get("name") or ""), p["port"], str(p.get("protocol") or "TCP"),
                                     p.get("appProtocol") if isinstance(p.get("appProtocol"), str) else None))
    families = spec.get("ipFamilies") or []
    family = families[0] if families and families[0] in ("IPv4", "IPv6") else "IPv4"
    ns = str(meta.get("namespace") or "default")
    return ServiceView(ns, meta["name"], str(spec.get("type") or "ClusterIP"), family, tuple(ports),
                       _opaque_annotation(_str_map(meta.get("annotations")), f"service {ns}/{meta['name']}"))


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    port: int
    protocol: str
    app_protocol: str | None


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    address: str
    ready: bool
    pod: str | None          # targetRef name when it is a Pod in the slice's namespace
    has_target: bool         # any targetRef at all
    zone: str | None


@dataclass(frozen=True, slots=True)
class SliceView:
    namespace: str
    name: str
    service: str | None      # "name.ns" from kubernetes.io/service-name
    address_type: str
    ports: tuple[SlicePort, ...]
    endpoints: tuple[SliceEndpoint, ...]

    def port_named(self, name: str, protocol: str = "TCP") -> SlicePort | None:
        return next((p for p in self.ports if p.name == name and p.protocol == protocol), None)


def slice_view(obj: Mapping[str, Any]) -> SliceView:
    meta = object_meta(obj)
    ns = str(meta.get("namespace") or "default")
    svc = _str_map(meta.get("labels")).get(SERVICE_NAME_LABEL)
    ports = []
    for p in obj.get("ports") or []:
        # a port with a null number means "all ports" (selector-less slices): not a mesh port
        if isinstance(p, dict) and isinstance(p.get("port"), int):
            ports.append(SlicePort(str(p.get("name") or ""), p["port"], str(p.get("protocol") or "TCP"),
                                   p.get("appProtocol") if isinstance(p.get("appProtocol"), str) else None))
    endpoints = []
    for e in obj.get("endpoints") or []:
        if not isinstance(e, dict):
            continue
        addrs = [a for a in e.get("addresses") or [] if isinstance(a, str)]
        if not addrs:
            continue
        cond = e.get("conditions") or {}
        ready = cond.get("ready") is not False   # nil means ready (the API's rule)
        ref = e.get("targetRef") if isinstance(e.get("targetRef"), dict) else None
        pod = None
        if ref is not None and ref.get("kind") == "Pod" and (ref.get("namespace") or ns) == ns:
            pod = ref.get("name") if isinstance(ref.get("name"), str) else None
        zone = e.get("zone") if isinstance(e.get("zone"), str) else None
        endpoints.append(SliceEndpoint(addrs[0], ready, pod, ref is not None, zone))
    return SliceView(ns, meta["name"], f"{svc}.{ns}" if svc else None,
                     str(obj.get("addressType") or "IPv4"), tuple(ports), tuple(endpoints))


@dataclass(frozen=True, slots=True)
class PodView:
    namespace: str
    name: str
    service_account: str
    meshed: bool
    workload: str
    workload_kind: str
    opaque_ports: frozenset[int] | None


def meshed(pod: Mapping[str, Any], settings: Settings) -> bool:
    """Meshed by *this* control plane: the pod runs our proxy container (a native sidecar
    in initContainers, or a plain container), is not opted out, and — when it says —
    belongs to our control-plane namespace and trust root."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    if not any(isinstance(c, dict) and c.get("name") == PROXY_CONTAINER for c in containers):
        return False
    labels, annotations = _str_map(meta.get("labels")), _str_map(meta.get("annotations"))
    if annotations.get(INJECT_ANNOTATION) == "disabled":
        return False
    cp_ns = labels.get(CONTROL_PLANE_NS_LABEL)
    if cp_ns is not None and cp_ns != settings.control_plane_namespace:
        return False
    root = annotations.get(TRUST_ROOT_ANNOTATION)
    if settings.trust_root_sha256 and root is not None and root != settings.trust_root_sha256:
        return False
    return True


def workload_of(pod: Mapping[str, Any]) -> tuple[str, str]:
    """(kind, name) of the workload running the pod, e.g. ("deployment", "web")."""
    meta = pod.get("metadata") or {}
    labels = _str_map(meta.get("labels"))
    refs = [r for r in meta.get("ownerReferences") or [] if isinstance(r, dict)]
    ref = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    if ref is not None and isinstance(ref.get("name"), str) and isinstance(ref.get("kind"), str):
        kind, name = ref["kind"], ref["name"]
        if kind == "ReplicaSet":
            tpl_hash = labels.get("pod-template-hash")
            if tpl_hash and name.endswith("-" + tpl_hash):
                return "deployment", name[: -len(tpl_hash) - 1]
        return kind.lower(), name
    app = labels.get("app.kubernetes.io/name") or labels.get("app")
    if app:
        return "app", app
    return "pod", str(meta.get("name") or "")


def pod_view(obj: Mapping[str, Any], settings: Settings) -> PodView:
    meta = object_meta(obj)
    ns = str(meta.get("namespace") or "default")
    spec = obj.get("spec") or {}
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    kind, name = workload_of(obj)
    return PodView(ns, meta["name"], str(sa), meshed(obj, settings), name, kind,
                   _opaque_annotation(_str_map(meta.get("annotations")), f"pod {ns}/{meta['name']}"))


@dataclass(frozen=True, slots=True)
class NamespaceView:
    name: str
    opaque_ports: frozenset[int] | None


def namespace_view(obj: Mapping[str, Any]) -> NamespaceView:
    meta = object_meta(obj)
    return NamespaceView(meta["name"], _opaque_annotation(_str_map(meta.get("annotations")),
                                                          f"namespace {meta['name']}"))
