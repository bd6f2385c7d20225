"""The proxy-injector admission webhook: ``POST /v1/inject``, AdmissionReview v1 in and out.

- ``admit(review, config, namespace_annotations)`` is pure: it checks the review, runs the
  one transform (destination/inject.py, shared with ``mesh inject --manual``) on the Pod
  and answers with ``response.uid``, ``allowed`` and, when the pod was injected, a
  base64 RFC 6902 JSONPatch (``json_patch(old, new)``). A pod that is not opted in is
  allowed unpatched; a bad ``config.micromesh.io/*`` value is refused with a message that
  names it; a malformed review gets ``allowed: false`` with a message — never a traceback.
- Namespace annotations: in a cluster they come from the Namespace object, which the
  Kubernetes source of destination watches; here they come from an optional lookup
  function (``namespace -> annotations | None``), and default to none.
- Serving: the API server presents no client certificate, while destination's main
  listener requires one (mTLS). So the webhook has a listener of its own
  (``--webhook-port``) with server-only TLS: the certificate is ``--webhook-cert`` /
  ``--webhook-key`` (in a cluster, the Secret ``mesh install`` makes, whose CA is the
  webhook configuration's caBundle), or by default one issued by the mesh issuer for
  ``destination.<ns>.svc`` (then the caBundle is the trust-anchor bundle).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity import ca
from identity.store import MeshHome
from microproxy import __version__, ctlhttp, tls
from microproxy.ctlhttp import Request, Response

from .inject import DEFAULT_IMAGE, DEFAULT_NAMESPACE, InjectConfig, InjectError, inject_pod, owner_of

log = logging.getLogger(__name__)

PATH = "/v1/inject"
API_VERSION = "admission.k8s.io/v1"
CREATED_BY = f"micromesh/proxy-injector {__version__}"
MAX_REVIEW = 3 * 1024 * 1024          # the API server caps objects at ~1.5 MiB; reviews carry two
SERVING_CERT_LIFETIME = dt.timedelta(days=365)
WEBHOOK_CA_LIFETIME = dt.timedelta(days=3650)

NamespaceLookup = Callable[[str], "dict[str, str] | None"]


# === JSONPatch (RFC 6902) ===

def _pointer(path: str, key: str | int) -> str:
    return f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"


def json_patch(old: Any, new: Any, path: str = "") -> list[dict[str, Any]]:
    """Operations that turn ``old`` into ``new``: keys added/removed/replaced; a list that
    keeps its old items as one contiguous run gets ``add`` ops around it (so the patch
    inserts containers rather than rewriting the list), any other list change is a replace."""
    if isinstance(old, dict) and isinstance(new, dict):
        ops: list[dict[str, Any]] = []
        for key in old:
            if key not in new:
                ops.append({"op": "remove", "path": _pointer(path, key)})
        for key, value in new.items():
            if key not in old:
                ops.append({"op": "add", "path": _pointer(path, key), "value": value})
            elif old[key] != value:
                ops += json_patch(old[key], value, _pointer(path, key))
        return ops
    if isinstance(old, list) and isinstance(new, list) and old != new and len(new) > len(old):
        n = len(old)
        for start in range(len(new) - n + 1):
            if new[start:start + n] == old:
                return ([{"op": "add", "path": _pointer(path, i), "value": new[i]} for i in range(start)]
                        + [{"op": "add", "path": _pointer(path, "-"), "value": v} for v in new[start + n:]])
    if old == new:
        return []
    return [{"op": "replace", "path": path, "value": new}]


# === AdmissionReview ===

def _response(uid: str, allowed: bool, *, patch: list[dict[str, Any]] | None = None,
              message: str | None = None, code: int = 400,
              warnings: list[str] | None = None) -> dict[str, Any]:
    resp: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if patch:
        resp["patchType"] = "JSONPatch"
        resp["patch"] = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
    if message is not None and not allowed:
        resp["status"] = {"code": code, "message": message}
    if warnings:
        resp["warnings"] = warnings
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": resp}


class ReviewError(ValueError):
    """The review itself is malformed (answered allowed: false)."""


def _request(review: Any) -> dict[str, Any]:
    if not isinstance(review, dict):
        raise ReviewError("the body is not an AdmissionReview object")
    if review.get("kind") != "AdmissionReview" or review.get("apiVersion") != API_VERSION:
        raise ReviewError(f"want kind AdmissionReview, apiVersion {API_VERSION}")
    req = review.get("request")
    if not isinstance(req, dict):
        raise ReviewError("the AdmissionReview has no request")
    uid = req.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ReviewError("request.uid is missing")
    return req


def admit(review: Any, config: InjectConfig,
          namespace_annotations: NamespaceLookup | None = None) -> dict[str, Any]:
    """Answer one AdmissionReview (already parsed from JSON)."""
    try:
        req = _request(review)
    except ReviewError as e:
        uid = ""
        if isinstance(review, dict) and isinstance(review.get("request"), dict):
            uid = str(review["request"].get("uid") or "")
        return _response(uid, False, message=f"micromesh proxy-injector: {e}")
    uid = req["uid"]
    kind = req.get("kind") or {}
    if not isinstance(kind, dict) or (kind.get("group"), kind.get("kind")) != ("", "Pod") \
            or req.get("operation", "CREATE") != "CREATE":
        return _response(uid, True)   # only pod creation is ours; anything else passes untouched
    pod = req.get("object")
    if not isinstance(pod, dict) or not isinstance(pod.get("spec"), dict):
        return _response(uid, False, message="micromesh proxy-injector: request.object is not a Pod")
    meta: dict[str, Any] = pod["metadata"] if isinstance(pod.get("metadata"), dict) else {}
    namespace = req.get("namespace") or meta.get("namespace") or "default"
    ns_ann = namespace_annotations(namespace) if namespace_annotations is not None else None
    try:
        result = inject_pod(pod, owner_of(pod), config, namespace=namespace,
                            namespace_annotations=ns_ann or {}, require_opt_in=True)
    except InjectError as e:
        return _response(uid, False, message=f"micromesh proxy-injector: {e}")
    name = meta.get("name") or f"{meta.get('generateName') or ''}*"
    if not result.injected:
        log.debug("pod %s/%s not injected: %s", namespace, name, result.reason)
        return _response(uid, True)
    log.info("injected the proxy into pod %s/%s", namespace, name)
    return _response(uid, True, patch=json_patch(pod, result.template),
                     warnings=[f"micromesh: {n}" for n in result.notes] or None)


class Webhook:
    """The HTTP side: ``POST /v1/inject`` and ``GET /ready`` (the kubelet's probe: it cannot
    present the client certificate destination's main port requires)."""

    def __init__(self, config: Callable[[], InjectConfig],
                 namespace_annotations: NamespaceLookup | None = None) -> None:
        self.config = config
        self.namespace_annotations = namespace_annotations

    async def handle(self, req: Request) -> Response:
        if req.path == "/ready":
            return Response.json({"ok": True}) if req.method == "GET" else Response.error(405, "use GET")
        if req.path != PATH:
            return Response.error(404, f"no such path {req.path!r}")
        if req.method != "POST":
            return Response.error(405, "use POST")
        try:
            review = json.loads(req.body)
        except ValueError:
            return Response.json(_response("", False, message="micromesh proxy-injector: the body is not JSON"))
        return Response.json(admit(review, self.config(), self.namespace_annotations))


# === certificates ===

def new_ca(now: dt.datetime, common_name: str = "webhook.micromesh.io",
           lifetime: dt.timedelta = WEBHOOK_CA_LIFETIME) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA for the webhook's serving certificate (its PEM is the caBundle)."""
    key = ca.new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - ca.CLOCK_SKEW).not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def service_dns_names(service: str, namespace: str, cluster_domain: str = "cluster.local") -> list[str]:
    """The names the API server may use to reach a Service (it uses ``<svc>.<ns>.svc``)."""
    return [f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.{cluster_domain}"]


def serving_cert(dns_names: list[str], issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey,
                 now: dt.datetime, lifetime: dt.timedelta = SERVING_CERT_LIFETIME) -> tuple[bytes, bytes]:
    """(chain PEM, key PEM) of a TLS server certificate for ``dns_names``, signed by ``issuer``."""
    key = ca.new_key()
    not_after = min(now + lifetime, issuer.not_valid_after_utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
            .issuer_name(issuer.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - ca.CLOCK_SKEW).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),  # type: ignore[arg-type]
                           critical=False)
            .sign(issuer_key, hashes.SHA256()))
    return ca.cert_pem(cert) + ca.cert_pem(issuer), ca.key_pem(key)


def server_context(chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """Server-only TLS (the API server presents no client certificate); TLS 1.2+, as the
    API server's Go client may be configured either way."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    tls.load_pem_into(ctx, chain_pem, key_pem)
    return ctx


# === wiring into python -m destination ===

def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("proxy-injector webhook")
    g.add_argument("--webhook-port", type=int, default=None,
                   help="serve POST /v1/inject (AdmissionReview v1) on this port with server-only "
                        "TLS (default: no webhook)")
    g.add_argument("--webhook-cert", type=Path, default=None,
                   help="PEM certificate chain for the webhook listener (default: one issued by the "
                        "mesh issuer for destination.<control-plane-namespace>.svc)")
    g.add_argument("--webhook-key", type=Path, default=None, help="PEM key for --webhook-cert")
    g.add_argument("--proxy-image", default=DEFAULT_IMAGE,
                   help=f"image of the injected containers (default {DEFAULT_IMAGE})")
    g.add_argument("--control-plane-namespace", default=DEFAULT_NAMESPACE,
                   help=f"namespace of identity and destination (default {DEFAULT_NAMESPACE})")
    g.add_argument("--cluster-domain", default="cluster.local", help="cluster DNS domain (default cluster.local)")


def from_args(args: argparse.Namespace, home: MeshHome,
              namespace_annotations: NamespaceLookup | None = None,
              now: Callable[[], dt.datetime] | None = None) -> list[Callable[[], Any]]:
    """The background task serving the webhook (an empty list without ``--webhook-port``).
    Raises ValueError for unusable flags or certificate files."""
    if args.webhook_port is None:
        if args.webhook_cert or args.webhook_key:
            raise ValueError("--webhook-cert/--webhook-key need --webhook-port")
        return []
    if not 0 <= args.webhook_port <= 65535:
        raise ValueError("--webhook-port must be in 0..65535")
    if (args.webhook_cert is None) != (args.webhook_key is None):
        raise ValueError("give both --webhook-cert and --webhook-key, or neither")
    if args.webhook_cert is not None:
        chain, key = args.webhook_cert.read_bytes(), args.webhook_key.read_bytes()
    else:
        issuer, issuer_key = home.issuer()
        when = now() if now is not None else dt.datetime.now(dt.timezone.utc)
        chain, key = serving_cert(service_dns_names("destination", args.control_plane_namespace,
                                                    args.cluster_domain), issuer, issuer_key, when)
    try:
        ctx = server_context(chain, key)
    except ssl.SSLError as e:
        raise ValueError(f"unusable webhook certificate or key: {e}") from None

    def config() -> InjectConfig:  # the bundle is re-read per review: it follows rotations
        return InjectConfig(trust_anchors_pem=home.trust_pem(),
                            control_plane_namespace=args.control_plane_namespace,
                            image=args.proxy_image, trust_domain=args.trust_domain,
                            cluster_domain=args.cluster_domain, created_by=CREATED_BY)

    webhook = Webhook(config, namespace_annotations)

    async def serve() -> None:
        server = await ctlhttp.serve(webhook.handle, args.host, args.webhook_port, ssl=ctx,
                                     max_body=MAX_REVIEW)
        log.info("proxy-injector webhook listening on %s:%d", args.host,
                 server.sockets[0].getsockname()[1])
        try:
            await asyncio.Event().wait()      # until cancelled at shutdown
        finally:
            server.close()

    return [serve]
