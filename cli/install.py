"""`mesh install` / `mesh uninstall`: the Kubernetes manifests of the control plane.

Pure functions returning lists of dicts (``manifests(opts, certs)``); cli/inject.py has the
click commands. Every built-in kind here passes ``kubernetes_validate`` in strict mode for
Kubernetes 1.32 (tests/test_install.py); the CRD's own schema is checked against sample
AuthorizationPolicies.

The layout in the cluster (namespace ``micromesh`` by default):

- identity and destination each run ``python -m identity|destination --home /var/run/micromesh``
  from the one image. The home is an emptyDir (destination keeps its state there); its
  ``ca/`` is a read-only projected volume with the mesh-home file names: ``bundle.crt`` and
  ``anchor.crt`` from the ConfigMap ``micromesh-identity-trust-roots``, ``issuer.crt``,
  ``issuer.key`` and ``token.secret`` from the Secret ``micromesh-identity-issuer``.
- destination also serves the proxy-injector webhook on 8443 (Service port 443) with the
  certificate of the Secret ``micromesh-proxy-injector-tls``, whose CA is the caBundle of
  the MutatingWebhookConfiguration ``micromesh-proxy-injector``.
- Its /ready probe goes to that webhook port: the main port (8086) requires a client
  certificate, which the kubelet does not have.
- CRDs: only micromesh's own (AuthorizationPolicy). HTTPRoute is Gateway API's
  (gateway.networking.k8s.io/v1): install the Gateway API CRDs first, as Linkerd asks;
  destination treats a missing CRD as "no routes" and looks again (k8s_resources.py).
"""
from __future__ import annotations

import base64
import datetime as dt
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from destination import webhook
from destination.inject import (ADMIN_PORT, DEFAULT_IMAGE, DEFAULT_NAMESPACE, DESTINATION_PORT,
                                IDENTITY_PORT, INJECT_ANNOTATION, TOKEN_AUDIENCE)
from destination.resources import GROUP
from microproxy.core.httproute import GROUP as GATEWAY_GROUP
from identity import ca
from microproxy import __version__

WEBHOOK_PORT = 8443
CONTROLLER_UID = 2103          # the control plane's uid (the proxy's is 2102), as in Linkerd
HOME = "/var/run/micromesh"
COMPONENT_LABEL = "micromesh.io/control-plane-component"
PART_OF = {"app.kubernetes.io/part-of": "micromesh", "app.kubernetes.io/version": __version__}
TRUST_ROOTS = "micromesh-identity-trust-roots"
ISSUER_SECRET = "micromesh-identity-issuer"
WEBHOOK_SECRET = "micromesh-proxy-injector-tls"
WEBHOOK_CONFIG = "micromesh-proxy-injector"
KUBE_VERSION = "1.32.0"        # what the manifests are validated against (native sidecars: >= 1.29)
# In a cluster: identity proves tokens with TokenReview, destination reads the API server.
IDENTITY_KUBE_ARGS = ["--token-validator", "tokenreview"]
DESTINATION_KUBE_ARGS = ["--source", "kubernetes"]


class InstallError(ValueError):
    """Unusable certificate files or options (the CLI prints the one-line message)."""


@dataclass(frozen=True, slots=True)
class InstallOptions:
    namespace: str = DEFAULT_NAMESPACE
    image: str = DEFAULT_IMAGE
    ha: bool = False
    trust_domain: str = ca.DEFAULT_TRUST_DOMAIN
    cluster_domain: str = "cluster.local"

    @property
    def replicas(self) -> int:
        return 3 if self.ha else 1


@dataclass(frozen=True, slots=True)
class Certs:
    trust_anchors_pem: bytes
    issuer_crt_pem: bytes
    issuer_key_pem: bytes
    token_secret: bytes
    webhook_ca_pem: bytes
    webhook_crt_pem: bytes
    webhook_key_pem: bytes


# === certificates ===

def _webhook_certs(opts: InstallOptions, now: dt.datetime) -> tuple[bytes, bytes, bytes]:
    wca, wkey = webhook.new_ca(now)
    chain, key = webhook.serving_cert(webhook.service_dns_names("destination", opts.namespace,
                                                                opts.cluster_domain), wca, wkey, now)
    return ca.cert_pem(wca), chain, key


def generate_certs(opts: InstallOptions, now: dt.datetime) -> Certs:
    """A new trust anchor and issuer (identity/ca.py) and a webhook CA and serving cert."""
    anchor, akey = ca.new_anchor(now, opts.trust_domain)
    issuer, ikey = ca.new_issuer(anchor, akey, now, opts.trust_domain)
    return Certs(ca.cert_pem(anchor), ca.cert_pem(issuer), ca.key_pem(ikey), secrets.token_bytes(32),
                 *_webhook_certs(opts, now))


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # InvalidSignature, ValueError (names differ), TypeError (key type)
        return False
    return True


def load_certs(opts: InstallOptions, anchors_pem: bytes, issuer_pem: bytes, key_pem: bytes,
               now: dt.datetime) -> Certs:
    """Given trust anchors, issuer certificate and key: check that they fit together.
    Raises InstallError with a one-line reason."""
    try:
        anchors = ca.load_certs(anchors_pem)
    except ValueError:
        anchors = []
    if not anchors:
        raise InstallError("--identity-trust-anchors-file holds no PEM certificate")
    for a in anchors:
        if not _is_ca(a):
            raise InstallError(f"trust anchor {a.subject.rfc4514_string()} is not a CA certificate")
        if not a.not_valid_before_utc <= now <= a.not_valid_after_utc:
            raise InstallError(f"trust anchor {a.subject.rfc4514_string()} is not valid now "
                               f"(valid {a.not_valid_before_utc:%Y-%m-%d} to {a.not_valid_after_utc:%Y-%m-%d})")
    try:
        issuer = ca.load_certs(issuer_pem)[0]
    except (ValueError, IndexError):
        raise InstallError("--identity-issuer-certificate-file holds no PEM certificate") from None
    if not _is_ca(issuer):
        raise InstallError("the issuer certificate is not a CA certificate (it must sign proxy certificates)")
    if not issuer.not_valid_before_utc <= now <= issuer.not_valid_after_utc:
        raise InstallError(f"the issuer certificate is not valid now (valid {issuer.not_valid_before_utc:%Y-%m-%d} "
                           f"to {issuer.not_valid_after_utc:%Y-%m-%d})")
    if not any(_signed_by(issuer, a) for a in anchors):
        raise InstallError("the issuer certificate is not signed by the trust anchors")
    try:
        key = ca.load_key(key_pem)
    except (ValueError, TypeError) as e:
        raise InstallError(f"--identity-issuer-key-file: not an unencrypted ECDSA PEM key ({e})") from None
    pub = issuer.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or \
            pub.public_numbers() != key.public_key().public_numbers():
        raise InstallError("the issuer key does not match the issuer certificate")
    return Certs(anchors_pem, ca.cert_pem(issuer), key_pem, secrets.token_bytes(32),
                 *_webhook_certs(opts, now))


# === manifest pieces ===

def _meta(name: str, namespace: str | None = None, component: str | None = None,
          **extra: Any) -> dict[str, Any]:
    labels = dict(PART_OF)
    if component:
        labels[COMPONENT_LABEL] = component
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = labels
    meta.update(extra)
    return meta


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def namespace(opts: InstallOptions) -> dict[str, Any]:
    meta = _meta(opts.namespace, annotations={INJECT_ANNOTATION: "disabled"})
    meta["labels"].update({INJECT_ANNOTATION: "disabled", "micromesh.io/is-control-plane": "true"})
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def service_accounts(opts: InstallOptions) -> list[dict[str, Any]]:
    return [{"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": _meta(name, opts.namespace, name)} for name in ("identity", "destination")]


# Exactly what the control plane calls: identity reviews tokens; destination watches.
RBAC: dict[str, list[dict[str, Any]]] = {
    "identity": [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
    ],
    "destination": [
        {"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [GROUP], "resources": ["authorizationpolicies"], "verbs": ["get", "list", "watch"]},
        # HTTPRoute's CRD is Gateway API's (installed separately, as for Linkerd), not ours
        {"apiGroups": [GATEWAY_GROUP], "resources": ["httproutes", "grpcroutes"], "verbs": ["get", "list", "watch"]},
    ],
}


def rbac(opts: InstallOptions) -> list[dict[str, Any]]:
    out = []
    for component, rules in RBAC.items():
        name = f"micromesh-{opts.namespace}-{component}" if opts.namespace != DEFAULT_NAMESPACE \
            else f"micromesh-{component}"
        out.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                    "metadata": _meta(name, component=component), "rules": rules})
        out.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                    "metadata": _meta(name, component=component),
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                    "subjects": [{"kind": "ServiceAccount", "name": component, "namespace": opts.namespace}]})
    return out


def trust_roots(opts: InstallOptions, certs: Certs) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(TRUST_ROOTS, opts.namespace, "identity"),
            "data": {"ca-bundle.crt": certs.trust_anchors_pem.decode("ascii")}}


def secrets_(opts: InstallOptions, certs: Certs) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
         "metadata": _meta(ISSUER_SECRET, opts.namespace, "identity"),
         "data": {"tls.crt": _b64(certs.issuer_crt_pem), "tls.key": _b64(certs.issuer_key_pem),
                  "token.secret": _b64(certs.token_secret)}},
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
         "metadata": _meta(WEBHOOK_SECRET, opts.namespace, "destination"),
         "data": {"tls.crt": _b64(certs.webhook_crt_pem), "tls.key": _b64(certs.webhook_key_pem),
                  "ca.crt": _b64(certs.webhook_ca_pem)}},
    ]


def _ca_volume() -> dict[str, Any]:
    """The mesh home's ca/ directory, assembled from the ConfigMap and the Secret."""
    return {"name": "ca", "projected": {"defaultMode": 0o440, "sources": [
        {"configMap": {"name": TRUST_ROOTS, "items": [{"key": "ca-bundle.crt", "path": "bundle.crt"},
                                                      {"key": "ca-bundle.crt", "path": "anchor.crt"}]}},
        {"secret": {"name": ISSUER_SECRET, "items": [{"key": "tls.crt", "path": "issuer.crt"},
                                                     {"key": "tls.key", "path": "issuer.key"},
                                                     {"key": "token.secret", "path": "token.secret"}]}},
    ]}}


def _probe(port: int, **kw: int) -> dict[str, Any]:
    return {"httpGet": {"path": "/ready", "port": port, "scheme": "HTTPS"}, **kw}


def _security_context() -> dict[str, Any]:
    return {"runAsUser": CONTROLLER_UID, "runAsGroup": CONTROLLER_UID, "runAsNonRoot": True,
            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _deployment(opts: InstallOptions, component: str, args: list[str], ports: list[dict[str, Any]],
                probe_port: int, extra_mounts: list[dict[str, Any]] | None = None,
                extra_volumes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    selector = {COMPONENT_LABEL: component}
    pod_spec: dict[str, Any] = {
        "serviceAccountName": component,
        "securityContext": {"fsGroup": CONTROLLER_UID, "runAsNonRoot": True,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": component,
            "image": opts.image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["python", "-m", component],
            "args": ["--home", HOME, "--host", "0.0.0.0", "--trust-domain", opts.trust_domain,
                     "--log-level", "info", *args],
            "ports": ports,
            "readinessProbe": _probe(probe_port, periodSeconds=10, failureThreshold=3),
            "livenessProbe": _probe(probe_port, initialDelaySeconds=10, periodSeconds=10, failureThreshold=3),
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "250Mi"}},
            "securityContext": _security_context(),
            "volumeMounts": [{"name": "home", "mountPath": HOME},
                             {"name": "ca", "mountPath": f"{HOME}/ca", "readOnly": True}, *(extra_mounts or [])],
        }],
        "volumes": [{"name": "home", "emptyDir": {}}, _ca_volume(), *(extra_volumes or [])],
    }
    if opts.ha:
        pod_spec["affinity"] = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "podAffinityTerm": {"labelSelector": {"matchLabels": selector},
                                               "topologyKey": "kubernetes.io/hostname"}}]}}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(component, opts.namespace, component),
        "spec": {
            "replicas": opts.replicas,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": {**PART_OF, **selector},
                                      "annotations": {INJECT_ANNOTATION: "disabled"}},
                         "spec": pod_spec},
        },
    }


def deployments(opts: InstallOptions) -> list[dict[str, Any]]:
    identity = _deployment(opts, "identity", ["--port", str(IDENTITY_PORT), *IDENTITY_KUBE_ARGS],
                           [{"name": "identity", "containerPort": IDENTITY_PORT, "protocol": "TCP"}],
                           IDENTITY_PORT)
    destination = _deployment(
        opts, "destination",
        ["--port", str(DESTINATION_PORT), *DESTINATION_KUBE_ARGS, "--webhook-port", str(WEBHOOK_PORT),
         "--webhook-cert", f"{HOME}/webhook/tls.crt", "--webhook-key", f"{HOME}/webhook/tls.key",
         "--proxy-image", opts.image, "--control-plane-namespace", opts.namespace,
         "--cluster-domain", opts.cluster_domain],
        [{"name": "destination", "containerPort": DESTINATION_PORT, "protocol": "TCP"},
         {"name": "webhook", "containerPort": WEBHOOK_PORT, "protocol": "TCP"}],
        WEBHOOK_PORT,
        extra_mounts=[{"name": "webhook-tls", "mountPath": f"{HOME}/webhook", "readOnly": True}],
        extra_volumes=[{"name": "webhook-tls", "secret": {"secretName": WEBHOOK_SECRET, "defaultMode": 0o440}}])
    return [identity, destination]


def services(opts: InstallOptions) -> list[dict[str, Any]]:
    def svc(component: str, ports: list[dict[str, Any]]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(component, opts.namespace, component),
                "spec": {"type": "ClusterIP", "selector": {COMPONENT_LABEL: component}, "ports": ports}}
    return [
        svc("identity", [{"name": "identity", "port": IDENTITY_PORT, "targetPort": IDENTITY_PORT,
                          "protocol": "TCP"}]),
        svc("destination", [{"name": "destination", "port": DESTINATION_PORT, "targetPort": DESTINATION_PORT,
                             "protocol": "TCP"},
                            {"name": "webhook", "port": 443, "targetPort": WEBHOOK_PORT, "protocol": "TCP"}]),
    ]


def pod_disruption_budgets(opts: InstallOptions) -> list[dict[str, Any]]:
    return [{"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
             "metadata": _meta(component, opts.namespace, component),
             "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {COMPONENT_LABEL: component}}}}
            for component in ("identity", "destination")]


def webhook_configuration(opts: InstallOptions, certs: Certs) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": _meta(WEBHOOK_CONFIG, component="destination"),
        "webhooks": [{
            "name": "proxy-injector.micromesh.io",
            "admissionReviewVersions": ["v1"],
            "clientConfig": {"service": {"name": "destination", "namespace": opts.namespace,
                                         "path": webhook.PATH, "port": 443},
                             "caBundle": _b64(certs.webhook_ca_pem)},
            "failurePolicy": "Fail" if opts.ha else "Ignore",
            "matchPolicy": "Equivalent",
            "reinvocationPolicy": "Never",
            "sideEffects": "None",
            "timeoutSeconds": 10,
            "namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                 "values": ["kube-system", "cert-manager", opts.namespace]},
                {"key": "config.micromesh.io/admission-webhooks", "operator": "NotIn", "values": ["disabled"]},
            ]},
            # The control plane's own pods never go through the injector (also with --ha's Fail).
            "objectSelector": {"matchExpressions": [{"key": COMPONENT_LABEL, "operator": "DoesNotExist"}]},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"], "scope": "Namespaced"}],
        }],
    }


# The CRD schema follows destination/resources.py's validation (which stays the authority:
# it also rejects what a schema cannot express, like an empty `from`).
_STRINGS = {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}
AUTHORIZATION_POLICY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "targetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                              "properties": {"kind": {"type": "string", "enum": ["Workload"]},
                                             "name": {"type": "string", "maxLength": 63,
                                                      "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                                             "port": {"type": "integer", "minimum": 1, "maximum": 65535}}},
                "action": {"type": "string", "enum": ["ALLOW", "DENY", "AUDIT"], "default": "ALLOW"},
                "rules": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "from": {"type": "object", "additionalProperties": False,
                                 "properties": {"serviceAccounts": _STRINGS, "identities": _STRINGS,
                                                "namespaces": _STRINGS, "unauthenticated": {"type": "boolean"}}},
                        "to": {"type": "object", "additionalProperties": False,
                               "properties": {"methods": _STRINGS, "paths": _STRINGS,
                                              "ports": {"type": "array", "minItems": 1, "items": {
                                                  "type": "integer", "minimum": 1, "maximum": 65535}}}},
                    }}},
            },
        },
    },
}


def crds() -> list[dict[str, Any]]:
    return [{
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": _meta(f"authorizationpolicies.{GROUP}"),
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": "AuthorizationPolicy", "listKind": "AuthorizationPolicyList",
                      "plural": "authorizationpolicies", "singular": "authorizationpolicy",
                      "shortNames": ["authz", "ap"], "categories": ["micromesh", "policy"]},
            "versions": [{
                "name": "v1alpha1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": AUTHORIZATION_POLICY_SCHEMA},
                "additionalPrinterColumns": [
                    {"name": "Target", "type": "string", "jsonPath": ".spec.targetRef.name"},
                    {"name": "Action", "type": "string", "jsonPath": ".spec.action"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
            }],
        },
    }]


def manifests(opts: InstallOptions, certs: Certs) -> list[dict[str, Any]]:
    """Everything `mesh install` prints, in an order `kubectl apply -f -` can create it."""
    out = [namespace(opts), *crds(), *service_accounts(opts), *rbac(opts),
           trust_roots(opts, certs), *secrets_(opts, certs), *services(opts), *deployments(opts)]
    if opts.ha:
        out += pod_disruption_budgets(opts)
    out.append(webhook_configuration(opts, certs))
    return out


_PLACEHOLDER = Certs(b"", b"", b"", b"", b"", b"", b"")


def uninstall(opts: InstallOptions) -> list[dict[str, Any]]:
    """What `mesh uninstall` prints: a reference (apiVersion, kind, name, namespace) to every
    object `mesh install --ha` makes, webhook first (so pods are not held up while the
    control plane goes away), CRDs last (deleting them deletes every AuthorizationPolicy)."""
    every = manifests(InstallOptions(opts.namespace, opts.image, True, opts.trust_domain,
                                     opts.cluster_domain), _PLACEHOLDER)
    refs = []
    for obj in reversed(every):
        meta = {k: obj["metadata"][k] for k in ("name", "namespace") if k in obj["metadata"]}
        refs.append({"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": meta})
    crd = [r for r in refs if r["kind"] == "CustomResourceDefinition"]
    ns = [r for r in refs if r["kind"] == "Namespace"]
    rest = [r for r in refs if r not in crd and r not in ns]
    return rest + ns + crd
