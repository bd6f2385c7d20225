"""Proxy injection: the one transform behind both `mesh inject` and the admission webhook.

Pure: a pod template (``{"metadata": ..., "spec": ...}``, i.e. a Pod or a workload's
``spec.template``) plus the namespace's annotations and an ``InjectConfig`` in, a new
template out. No I/O, no clock. ``mesh inject --manual`` (cli/inject.py) and
``POST /v1/inject`` (destination/webhook.py, which turns the result into a JSONPatch) call
``inject_pod``; nothing else decides what an injected pod looks like.

Theory of operation
-------------------
- Opt-in: ``micromesh.io/inject: enabled|disabled`` on the pod (template) or its namespace;
  the pod's wins. The webhook injects only opted-in pods (``require_opt_in=True``);
  ``mesh inject --manual`` injects whatever it is given unless the pod says ``disabled``.
- Skipped, with a reason (never an error): a pod that already has ``micromesh-proxy``
  ("already injected": injection is idempotent), ``disabled`` pods, host-network pods.
- Overrides are ``config.micromesh.io/*`` annotations on the pod (then the namespace).
  Each value is validated; a bad one raises ``InjectError`` naming the annotation (the
  webhook refuses the pod with that message, the CLI fails with it). Unknown
  ``config.micromesh.io/*`` keys are reported as notes, not errors.
- What injection adds (Linkerd's proxy-injector, with a native sidecar):
  ``initContainers = [micromesh-init, micromesh-proxy, *the pod's own]``.
  ``micromesh-init`` runs ``python -m microproxy.init`` (nat rules: inbound -> 4143,
  outbound -> 4140, the proxy uid, admin and skipped ports exempt) with NET_ADMIN/NET_RAW.
  ``micromesh-proxy`` has ``restartPolicy: Always`` (a native sidecar, Kubernetes >= 1.29):
  it starts before the app (its startupProbe on /ready holds the app back until the proxy
  has its certificate), stays up beside it, and is stopped after the app exits, so Jobs
  complete. The proxy is configured with the MESH_* variables of microproxy/config.py.
- Trust anchors are put inline in ``MESH_TRUST_ANCHORS``, as Linkerd does with
  ``LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS``: a pod can only mount ConfigMaps of its own
  namespace, and the anchors ConfigMap lives in the control-plane namespace. Their SHA-256
  is the ``micromesh.io/trust-root-sha256`` annotation.
- The identity token is a projected ServiceAccount token (audience
  ``identity.micromesh.io``, 24 h) read from ``MESH_TOKEN_FILE``.
"""
from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from microproxy import __version__
from microproxy.policy import MODES

# === names ===

INJECT_ANNOTATION = "micromesh.io/inject"
ENABLED, DISABLED = "enabled", "disabled"
CONFIG_PREFIX = "config.micromesh.io/"
CONTROL_PLANE_NS_LABEL = "micromesh.io/control-plane-ns"
WORKLOAD_NS_LABEL = "micromesh.io/workload-ns"
PROXY_VERSION_ANNOTATION = "micromesh.io/proxy-version"
TRUST_ROOT_ANNOTATION = "micromesh.io/trust-root-sha256"
CREATED_BY_ANNOTATION = "micromesh.io/created-by"

PROXY_CONTAINER = "micromesh-proxy"
INIT_CONTAINER = "micromesh-init"
TOKEN_VOLUME = "micromesh-identity-token"
TOKEN_DIR = "/var/run/secrets/tokens"
TOKEN_FILE = f"{TOKEN_DIR}/{TOKEN_VOLUME}"
TOKEN_AUDIENCE = "identity.micromesh.io"
TOKEN_EXPIRATION = 24 * 3600
XTABLES_VOLUME = "micromesh-init-xtables-lock"

INBOUND_PORT = 4143
OUTBOUND_PORT = 4140
ADMIN_PORT = 4191
PROXY_UID = 2102
IGNORED_INBOUND = (4190, ADMIN_PORT)   # the admin port (and Linkerd's tap port) bypass the proxy
IDENTITY_PORT = 8080
DESTINATION_PORT = 8086

DEFAULT_IMAGE = "micromesh:dev"
DEFAULT_NAMESPACE = "micromesh"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# Which owner kinds get a micromesh.io/proxy-<kind> label (as linkerd.io/proxy-deployment).
WORKLOAD_KINDS = ("deployment", "replicaset", "statefulset", "daemonset", "job", "cronjob",
                  "replicationcontroller")


class InjectError(ValueError):
    """A pod that cannot be injected as asked: the message names the annotation or field."""


@dataclass(frozen=True, slots=True)
class InjectConfig:
    """What the control plane tells every injected proxy (the same for the CLI and the webhook)."""
    trust_anchors_pem: bytes
    control_plane_namespace: str = DEFAULT_NAMESPACE
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    proxy_version: str = __version__
    trust_domain: str = "cluster.local"
    cluster_domain: str = "cluster.local"
    created_by: str = f"micromesh/cli {__version__}"

    @property
    def trust_root_sha256(self) -> str:
        return hashlib.sha256(self.trust_anchors_pem).hexdigest()

    def service_addr(self, service: str, port: int) -> str:
        return f"{service}.{self.control_plane_namespace}.svc.{self.cluster_domain}:{port}"


@dataclass(frozen=True, slots=True)
class Owner:
    """The workload a pod belongs to: ``Owner("deployment", "web")``."""
    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class Overrides:
    skip_inbound_ports: str = ""
    skip_outbound_ports: str = ""
    opaque_ports: str = ""
    cpu_request: str | None = None
    cpu_limit: str | None = None
    memory_request: str | None = None
    memory_limit: str | None = None
    log_level: str = "warning"
    default_inbound_policy: str = "all-unauthenticated"
    shutdown_grace_period: float = 30.0


@dataclass(frozen=True, slots=True)
class Result:
    """``injected`` is False when the pod was skipped; ``reason`` then says why."""
    injected: bool
    template: dict[str, Any]
    reason: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


# === values of the override annotations ===

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
            "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
            "P": Decimal("1e15"), "E": Decimal("1e18")}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|h|m|s)")
_UNITS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}


def _bad(key: str, value: str, want: str) -> InjectError:
    return InjectError(f"{key}: {value!r} is not {want}")


def quantity(key: str, value: str, memory: bool = False) -> Decimal:
    """A Kubernetes resource quantity (``100m``, ``0.5``, ``64Mi``, ``1e3``) as a number."""
    m = _QUANTITY.match(value.strip())
    if not m:
        raise _bad(key, value, "a Kubernetes quantity such as " + ("64Mi" if memory else "100m"))
    number, suffix = Decimal(m.group(1)), m.group(2) or ""
    if memory and suffix in ("n", "u", "m"):
        raise _bad(key, value, "a memory quantity in bytes such as 64Mi (m means milli-bytes)")
    if suffix in _BINARY:
        amount = number * _BINARY[suffix]
    elif suffix in _DECIMAL:
        amount = number * _DECIMAL[suffix]
    else:
        try:
            amount = number * Decimal(10) ** int(suffix[1:])
        except (InvalidOperation, ValueError):
            raise _bad(key, value, "a Kubernetes quantity") from None
    if amount <= 0:
        raise _bad(key, value, "a positive quantity")
    return amount


def port_list(key: str, value: str) -> str:
    """``"25, 587,4000-4010"`` -> ``"25,587,4000-4010"``; every port in 1..65535."""
    out = []
    for item in value.split(","):
        item = item.strip()
        lo, sep, hi = item.partition("-")
        ends = (lo, hi) if sep else (lo,)
        if not all(e.isdigit() and len(e) <= 5 and 1 <= int(e) <= 65535 for e in ends):
            raise _bad(key, value, "a comma-separated list of ports or port ranges such as 25,4000-4010")
        if sep and int(lo) > int(hi):
            raise _bad(key, value, f"a list of port ranges: {item} runs backwards")
        out.append("-".join(str(int(e)) for e in ends))
    return ",".join(out)


def duration_seconds(key: str, value: str) -> float:
    """``30``, ``30s``, ``1m30s``, ``500ms`` -> seconds (0 < s <= 1 day)."""
    text = value.strip()
    try:
        seconds = Decimal(text) if text and text.replace(".", "", 1).isdigit() else None
    except InvalidOperation:
        seconds = None
    if seconds is None:
        pos, seconds = 0, Decimal(0)
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            seconds += Decimal(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(text) or not text:
            raise _bad(key, value, "a duration such as 30s, 1m30s or 500ms")
    if not 0 < seconds <= 86400:
        raise _bad(key, value, "a duration above 0 and at most 24h")
    return float(seconds)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _bad(key, value, "one of " + ", ".join(choices))
    return value


def _ports(key: str, v: str) -> str:
    return port_list(key, v)


def _cpu(key: str, v: str) -> str:
    quantity(key, v)
    return v.strip()


def _memory(key: str, v: str) -> str:
    quantity(key, v, memory=True)
    return v.strip()


# annotation suffix -> (Overrides field, parser)
OVERRIDES: dict[str, tuple[str, Any]] = {
    "skip-inbound-ports": ("skip_inbound_ports", _ports),
    "skip-outbound-ports": ("skip_outbound_ports", _ports),
    "opaque-ports": ("opaque_ports", _ports),
    "proxy-cpu-request": ("cpu_request", _cpu),
    "proxy-cpu-limit": ("cpu_limit", _cpu),
    "proxy-memory-request": ("memory_request", _memory),
    "proxy-memory-limit": ("memory_limit", _memory),
    "proxy-log-level": ("log_level", lambda k, v: _choice(k, v.strip(), LOG_LEVELS)),
    "default-inbound-policy": ("default_inbound_policy", lambda k, v: _choice(k, v.strip(), MODES)),
    "shutdown-grace-period": ("shutdown_grace_period", duration_seconds),
}


def parse_overrides(pod_annotations: dict[str, str], namespace_annotations: dict[str, str] | None = None
                    ) -> tuple[Overrides, tuple[str, ...]]:
    """The ``config.micromesh.io/*`` overrides (the pod's win over the namespace's), and notes
    about keys nobody reads. Raises InjectError naming the first bad annotation."""
    merged = {**(namespace_annotations or {}), **pod_annotations}
    values: dict[str, Any] = {}
    notes = []
    for key, raw in sorted(merged.items()):
        if not key.startswith(CONFIG_PREFIX):
            continue
        entry = OVERRIDES.get(key[len(CONFIG_PREFIX):])
        if entry is None:
            notes.append(f"unknown annotation {key} ignored (known: "
                         + ", ".join(CONFIG_PREFIX + k for k in OVERRIDES) + ")")
            continue
        if not isinstance(raw, str):
            raise InjectError(f"{key}: must be a string (quote it in YAML)")
        name, parse = entry
        values[name] = parse(key, raw)
    for what in ("cpu", "memory"):
        req, lim = values.get(f"{what}_request"), values.get(f"{what}_limit")
        if req is not None and lim is not None and \
                quantity("", req, what == "memory") > quantity("", lim, what == "memory"):
            raise InjectError(f"{CONFIG_PREFIX}proxy-{what}-request: {req!r} is above "
                              f"{CONFIG_PREFIX}proxy-{what}-limit {lim!r}")
    return Overrides(**values), tuple(notes)


# === opt-in and ownership ===

def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    meta = obj.get("metadata") or {}
    ann = meta.get("annotations") or {}
    if not isinstance(ann, dict):
        raise InjectError("metadata.annotations: must be a mapping")
    return ann


def _opt_in_value(value: Any, where: str) -> str:
    if value not in (ENABLED, DISABLED):
        raise InjectError(f"{INJECT_ANNOTATION}: {value!r} on the {where} is not {ENABLED} or {DISABLED}")
    return str(value)


def opt_in(pod_annotations: dict[str, str], namespace_annotations: dict[str, str] | None) -> str | None:
    """``enabled``, ``disabled`` or None (no annotation): the pod's annotation wins."""
    if INJECT_ANNOTATION in pod_annotations:
        return _opt_in_value(pod_annotations[INJECT_ANNOTATION], "pod")
    if namespace_annotations and INJECT_ANNOTATION in namespace_annotations:
        return _opt_in_value(namespace_annotations[INJECT_ANNOTATION], "namespace")
    return None


def owner_of(pod: dict[str, Any]) -> Owner:
    """The workload behind a pod the API server admits: its controller owner reference,
    with a ReplicaSet's pod-template-hash stripped to name the Deployment (as Linkerd does
    by asking the API; the hash label makes that unnecessary); for a bare pod its
    ``app.kubernetes.io/name`` or ``app`` label, else its name. The same rule as
    destination/k8s.py's ``workload_of``, so MESH_WORKLOAD matches discovery's label."""
    meta = pod.get("metadata") or {}
    refs = [r for r in meta.get("ownerReferences") or [] if isinstance(r, dict)]
    ref = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    if ref and isinstance(ref.get("kind"), str) and isinstance(ref.get("name"), str):
        kind, name = ref["kind"].lower(), ref["name"]
        tmpl_hash = (meta.get("labels") or {}).get("pod-template-hash")
        if kind == "replicaset" and tmpl_hash and name.endswith("-" + tmpl_hash):
            return Owner("deployment", name[: -len(tmpl_hash) - 1])
        return Owner(kind, name)
    # as destination/k8s.py's workload_of: then the app labels, then the pod itself
    labels = meta.get("labels") or {}
    app = labels.get("app.kubernetes.io/name") or labels.get("app")
    if isinstance(app, str) and app:
        return Owner("app", app)
    name = meta.get("name") or (meta.get("generateName") or "").rstrip("-") or "pod"
    return Owner("pod", name)


def is_injected(spec: dict[str, Any]) -> bool:
    return any(c.get("name") == PROXY_CONTAINER
               for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])
               if isinstance(c, dict))


def udp_ports(spec: dict[str, Any]) -> list[str]:
    return [f"{p.get('containerPort')}/UDP"
            for c in (spec.get("containers") or []) if isinstance(c, dict)
            for p in (c.get("ports") or []) if isinstance(p, dict) and p.get("protocol") == "UDP"]


# === the transform ===

def inject_pod(template: dict[str, Any], owner: Owner, config: InjectConfig, *,
               namespace: str | None = None, namespace_annotations: dict[str, str] | None = None,
               require_opt_in: bool = False) -> Result:
    """Inject the proxy into a pod template; the input is not modified.

    ``namespace`` is the pod's namespace when known (the webhook always knows it). Raises
    InjectError for a bad ``micromesh.io/inject`` or ``config.micromesh.io/*`` value."""
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        raise InjectError("the pod has no spec")
    spec = template["spec"]
    if not isinstance(spec.get("containers"), list) or not spec["containers"]:
        raise InjectError("spec.containers: the pod has no containers")
    pod_ann = _annotations(template)
    choice = opt_in(pod_ann, namespace_annotations)
    if is_injected(spec):
        return Result(False, template, "already injected")
    if choice == DISABLED:
        where = "pod" if INJECT_ANNOTATION in pod_ann else "namespace"
        return Result(False, template, f"{INJECT_ANNOTATION}: {DISABLED} on the {where}")
    if require_opt_in and choice != ENABLED:
        return Result(False, template, f"not opted in ({INJECT_ANNOTATION}: {ENABLED} is on neither "
                                       "the pod nor its namespace)")
    if spec.get("hostNetwork") is True:
        return Result(False, template, "hostNetwork: true (pods on the host network cannot be meshed)")
    overrides, notes = parse_overrides(pod_ann, namespace_annotations)
    udp = udp_ports(spec)
    if udp:
        notes += (f"UDP ports are not proxied: {', '.join(udp)}",)

    out = copy.deepcopy(template)
    meta = out.setdefault("metadata", {})
    labels = meta.get("labels") or {}
    labels[CONTROL_PLANE_NS_LABEL] = config.control_plane_namespace
    if owner.kind in WORKLOAD_KINDS and len(owner.name) <= 63:
        labels[f"micromesh.io/proxy-{owner.kind}"] = owner.name
    if namespace:
        labels[WORKLOAD_NS_LABEL] = namespace
    meta["labels"] = labels
    annotations = meta.get("annotations") or {}
    annotations[CREATED_BY_ANNOTATION] = config.created_by
    annotations[PROXY_VERSION_ANNOTATION] = config.proxy_version
    annotations[TRUST_ROOT_ANNOTATION] = config.trust_root_sha256
    meta["annotations"] = annotations

    spec = out["spec"]
    spec["initContainers"] = [init_container(overrides, config),
                              proxy_container(owner, overrides, config),
                              *(spec.get("initContainers") or [])]
    spec["volumes"] = [*(spec.get("volumes") or []), *volumes()]
    return Result(True, out, notes=notes)


def init_container(o: Overrides, config: InjectConfig) -> dict[str, Any]:
    inbound_ignored = ",".join([*map(str, IGNORED_INBOUND), *filter(None, [o.skip_inbound_ports])])
    args = ["--incoming-proxy-port", str(INBOUND_PORT), "--outgoing-proxy-port", str(OUTBOUND_PORT),
            "--proxy-uid", str(PROXY_UID), "--inbound-ports-to-ignore", inbound_ignored]
    if o.skip_outbound_ports:
        args += ["--outbound-ports-to-ignore", o.skip_outbound_ports]
    return {
        "name": INIT_CONTAINER,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["python", "-m", "microproxy.init"],
        "args": args,
        "resources": {"requests": {"cpu": "10m", "memory": "20Mi"}, "limits": {"memory": "100Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # iptables-legacy takes /run/xtables.lock: a writable /run on a read-only root.
        "volumeMounts": [{"name": XTABLES_VOLUME, "mountPath": "/run"}],
    }


def _field(path: str) -> dict[str, Any]:
    return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def _fmt_seconds(s: float) -> str:
    return str(int(s)) if s == int(s) else repr(s)


def proxy_env(owner: Owner, o: Overrides, config: InjectConfig) -> list[dict[str, Any]]:
    env: list[tuple[str, Any]] = [
        ("MESH_IDENTITY_ADDR", config.service_addr("identity", IDENTITY_PORT)),
        ("MESH_DESTINATION_ADDR", config.service_addr("destination", DESTINATION_PORT)),
        ("MESH_TRUST_DOMAIN", config.trust_domain),
        ("MESH_TRUST_ANCHORS", config.trust_anchors_pem.decode("ascii")),
        ("MESH_TOKEN_FILE", TOKEN_FILE),
        ("MESH_WORKLOAD", owner.name),
        ("MESH_NAMESPACE", _field("metadata.namespace")),
        ("MESH_SERVICE_ACCOUNT", _field("spec.serviceAccountName")),
        ("MESH_INSTANCE", _field("metadata.name")),
        ("MESH_INBOUND_ADVERTISE_HOST", _field("status.podIP")),
        ("MESH_INBOUND_ADDR", f"0.0.0.0:{INBOUND_PORT}"),
        ("MESH_OUTBOUND_ADDR", f"127.0.0.1:{OUTBOUND_PORT}"),
        ("MESH_ADMIN_ADDR", f"0.0.0.0:{ADMIN_PORT}"),
        ("MESH_REGISTER", "0"),   # Kubernetes discovery comes from EndpointSlices
        ("MESH_LOG_LEVEL", o.log_level),
        ("MESH_DEFAULT_INBOUND_POLICY", o.default_inbound_policy),
        ("MESH_SHUTDOWN_GRACE_PERIOD", _fmt_seconds(o.shutdown_grace_period)),
    ]
    if o.opaque_ports:
        env.append(("MESH_OPAQUE_PORTS", o.opaque_ports))
    return [{"name": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in env]


def _resources(o: Overrides) -> dict[str, Any]:
    out: dict[str, dict[str, str]] = {}
    for kind, cpu, mem in (("requests", o.cpu_request, o.memory_request),
                           ("limits", o.cpu_limit, o.memory_limit)):
        part = {k: v for k, v in (("cpu", cpu), ("memory", mem)) if v is not None}
        if part:
            out[kind] = part
    return out


def _probe(path: str, **kw: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": ADMIN_PORT}, **kw}


def proxy_container(owner: Owner, o: Overrides, config: InjectConfig) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": PROXY_CONTAINER,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "restartPolicy": "Always",        # a native sidecar
        "command": ["python", "-m", "microproxy"],
        "env": proxy_env(owner, o, config),
        "ports": [{"name": "mesh-proxy", "containerPort": INBOUND_PORT, "protocol": "TCP"},
                  {"name": "mesh-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}],
        # The kubelet starts the next init container (and so the app) only once this passes.
        "startupProbe": _probe("/ready", periodSeconds=1, failureThreshold=120),
        "readinessProbe": _probe("/ready", periodSeconds=10, failureThreshold=3),
        "livenessProbe": _probe("/live", periodSeconds=10, failureThreshold=3),
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True}],
    }
    resources = _resources(o)
    if resources:
        c["resources"] = resources
    return c


def volumes() -> list[dict[str, Any]]:
    return [
        {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": TOKEN_AUDIENCE, "expirationSeconds": TOKEN_EXPIRATION, "path": TOKEN_VOLUME}}]}},
        {"name": XTABLES_VOLUME, "emptyDir": {}},
    ]


def annotate(template: dict[str, Any]) -> Result:
    """`mesh inject` without --manual: add ``micromesh.io/inject: enabled`` to the template."""
    pod_ann = _annotations(template)
    if pod_ann.get(INJECT_ANNOTATION) == DISABLED:
        return Result(False, template, f"{INJECT_ANNOTATION}: {DISABLED} on the pod")
    spec: dict[str, Any] = template["spec"] if isinstance(template.get("spec"), dict) else {}
    if is_injected(spec):
        return Result(False, template, "already injected")
    if spec.get("hostNetwork") is True:
        return Result(False, template, "hostNetwork: true (pods on the host network cannot be meshed)")
    _, notes = parse_overrides(pod_ann)
    udp = udp_ports(spec)
    if udp:
        notes += (f"UDP ports are not proxied: {', '.join(udp)}",)
    out = copy.deepcopy(template)
    meta = out.setdefault("metadata", {})
    meta["annotations"] = {**(meta.get("annotations") or {}), INJECT_ANNOTATION: ENABLED}
    return Result(True, out, notes=notes)
