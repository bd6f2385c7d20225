"""`mesh install` / `mesh uninstall` (cli/install.py): every built-in manifest passes
kubernetes-validate strict for Kubernetes 1.32; RBAC is exactly what the control plane
uses; given certificates are checked; --ha; the webhook's CA bundle really verifies the
serving certificate; the Dockerfile (and a podman build where a base image is local)."""
from __future__ import annotations

import base64
import datetime as dt
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from cryptography import x509

from cli import install as kube
from cli.main import cli
from destination.resources import ResourceError, validate as validate_resource
from identity import ca
from identity.store import MeshHome
from tests.controlplane_helpers import make_home

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parent.parent
KUBE_VERSION = kube.KUBE_VERSION


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def install(*args: str) -> list[dict[str, Any]]:
    r = run("install", *args)
    assert r.exit_code == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d is not None]


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> MeshHome:
    return make_home(tmp_path_factory.mktemp("install") / "mesh")


def ca_flags(home: MeshHome) -> list[str]:
    return ["--identity-trust-anchors-file", str(home.bundle_crt),
            "--identity-issuer-certificate-file", str(home.issuer_crt),
            "--identity-issuer-key-file", str(home.issuer_key)]


# === schema validity ===

@pytest.mark.parametrize("flags", [[], ["--ha"], ["--namespace", "mesh-system", "--image", "reg.example/micromesh:0.1.0"]])
def test_every_manifest_is_schema_valid(flags: list[str]) -> None:
    objs = install(*flags)
    assert len(objs) >= 15
    for obj in objs:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)   # raises on any error


def test_custom_resources_only_warn_and_match_the_crd_schema() -> None:
    """kubernetes-validate has no schema for our own kinds (it can only warn), so sample
    AuthorizationPolicies are checked against the CRD's openAPIV3Schema, and must agree with
    destination's own validation."""
    (crd,) = find(install("--crds"), "CustomResourceDefinition")
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    good = {"apiVersion": "policy.micromesh.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "billing-from-payment", "namespace": "default"},
            "spec": {"targetRef": {"kind": "Workload", "name": "billing", "port": 7002}, "action": "ALLOW",
                     "rules": [{"from": {"serviceAccounts": ["payment"]},
                                "to": {"methods": ["GET"], "paths": ["/charge*"], "ports": [7002]}}]}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(good, KUBE_VERSION, strict=True)
    jsonschema.validate(good, schema)
    validate_resource(good)
    for bad in ({"action": "PERMIT"}, {"targetRef": {"kind": "Service", "name": "x"}},
                {"rules": [{"from": {"users": ["x"]}}]}, {"rules": [{"to": {"ports": [0]}}]}, {"extra": 1}):
        obj = {**good, "spec": {**good["spec"], **bad}}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(obj, schema)
        with pytest.raises(ResourceError):
            validate_resource(obj)


# === what is installed ===

def test_rbac_is_exactly_what_the_control_plane_uses() -> None:
    objs = install()
    roles = {o["metadata"]["name"]: o["rules"] for o in find(objs, "ClusterRole")}
    assert roles == {
        "micromesh-identity": [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
                                "verbs": ["create"]}],
        "micromesh-destination": [
            {"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["policy.micromesh.io"], "resources": ["authorizationpolicies"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes", "grpcroutes"],
             "verbs": ["get", "list", "watch"]}],
    }
    for rules in roles.values():
        for rule in rules:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"]
    bindings = {o["metadata"]["name"]: o for o in find(objs, "ClusterRoleBinding")}
    for component in ("identity", "destination"):
        b = bindings[f"micromesh-{component}"]
        assert b["roleRef"]["name"] == f"micromesh-{component}"
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": component, "namespace": "micromesh"}]
    assert not find(objs, "Role") and not find(objs, "RoleBinding")
    assert {o["metadata"]["name"] for o in find(objs, "ServiceAccount")} == {"identity", "destination"}


def test_namespace_deployments_and_services() -> None:
    objs = install()
    (ns,) = find(objs, "Namespace")
    assert ns["metadata"]["name"] == "micromesh"
    assert ns["metadata"]["labels"]["micromesh.io/inject"] == "disabled"
    assert objs[0] is ns        # created before what lives in it
    for name, port in (("identity", 8080), ("destination", 8086)):
        (dep,) = find(objs, "Deployment", name)
        spec = dep["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        assert c["command"] == ["python", "-m", name] and c["image"] == "micromesh:dev"
        assert c["args"][c["args"].index("--port") + 1] == str(port)
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/ready"
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        assert c["resources"]["requests"] and c["resources"]["limits"]
        assert spec["serviceAccountName"] == name
        assert dep["spec"]["replicas"] == 1
        assert dep["spec"]["template"]["metadata"]["annotations"]["micromesh.io/inject"] == "disabled"
        (svc,) = find(objs, "Service", name)
        assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
        assert port in [p["port"] for p in svc["spec"]["ports"]]
    # destination's probe goes to the webhook listener: the main port requires a client cert
    (dest,) = find(objs, "Deployment", "destination")
    assert dest["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] == kube.WEBHOOK_PORT
    (svc,) = find(objs, "Service", "destination")
    assert {"name": "webhook", "port": 443, "targetPort": kube.WEBHOOK_PORT, "protocol": "TCP"} in svc["spec"]["ports"]
    assert not find(objs, "PodDisruptionBudget")


def test_webhook_configuration_and_its_ca_bundle() -> None:
    objs = install()
    (hook,) = find(objs, "MutatingWebhookConfiguration", "micromesh-proxy-injector")
    (w,) = hook["webhooks"]
    assert w["failurePolicy"] == "Ignore"
    assert w["clientConfig"]["service"] == {"name": "destination", "namespace": "micromesh",
                                            "path": "/v1/inject", "port": 443}
    assert w["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                           "resources": ["pods"], "scope": "Namespaced"}]
    assert w["admissionReviewVersions"] == ["v1"] and w["sideEffects"] == "None"
    (excluded,) = [e["values"] for e in w["namespaceSelector"]["matchExpressions"]
                   if e["key"] == "kubernetes.io/metadata.name"]
    assert {"kube-system", "micromesh"} <= set(excluded)
    assert w["objectSelector"]["matchExpressions"][0]["operator"] == "DoesNotExist"
    # the serving certificate in the Secret chains to the caBundle, for the Service's name
    bundle = x509.load_pem_x509_certificate(base64.b64decode(w["clientConfig"]["caBundle"]))
    (secret,) = find(objs, "Secret", kube.WEBHOOK_SECRET)
    assert secret["type"] == "kubernetes.io/tls"
    leaf = x509.load_pem_x509_certificates(base64.b64decode(secret["data"]["tls.crt"]))[0]
    leaf.verify_directly_issued_by(bundle)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "destination.micromesh.svc" in sans.get_values_for_type(x509.DNSName)
    key = ca.load_key(base64.b64decode(secret["data"]["tls.key"]))
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()  # type: ignore[union-attr]
    # the destination Deployment mounts that Secret and points --webhook-cert at it
    (dest,) = find(objs, "Deployment", "destination")
    args = dest["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--webhook-cert") + 1] == "/var/run/micromesh/webhook/tls.crt"
    vols = {v["name"]: v for v in dest["spec"]["template"]["spec"]["volumes"]}
    assert vols["webhook-tls"]["secret"]["secretName"] == kube.WEBHOOK_SECRET


def test_ha() -> None:
    objs = install("--ha")
    (hook,) = find(objs, "MutatingWebhookConfiguration")
    assert hook["webhooks"][0]["failurePolicy"] == "Fail"
    for name in ("identity", "destination"):
        (dep,) = find(objs, "Deployment", name)
        assert dep["spec"]["replicas"] == 3
        assert "podAntiAffinity" in dep["spec"]["template"]["spec"]["affinity"]
        (pdb,) = find(objs, "PodDisruptionBudget", name)
        assert pdb["spec"]["selector"] == dep["spec"]["selector"] and pdb["spec"]["maxUnavailable"] == 1


def test_generated_ca_is_a_working_mesh_ca() -> None:
    objs = install()
    (cm,) = find(objs, "ConfigMap", kube.TRUST_ROOTS)
    (anchor,) = ca.load_certs(cm["data"]["ca-bundle.crt"].encode())
    (secret,) = find(objs, "Secret", kube.ISSUER_SECRET)
    issuer = ca.load_certs(base64.b64decode(secret["data"]["tls.crt"]))[0]
    key = ca.load_key(base64.b64decode(secret["data"]["tls.key"]))
    issuer.verify_directly_issued_by(anchor)
    leaf_chain, _ = ca.self_issue(ca.identity_name("web", "emojivoto"), issuer, key, dt.datetime.now(dt.timezone.utc))
    ca.load_certs(leaf_chain)[0].verify_directly_issued_by(issuer)
    assert len(base64.b64decode(secret["data"]["token.secret"])) == 32
    # two installs never share a CA
    (cm2,) = find(install(), "ConfigMap", kube.TRUST_ROOTS)
    assert cm2["data"] != cm["data"]


def test_given_certificates_are_used(home: MeshHome) -> None:
    objs = install(*ca_flags(home))
    (cm,) = find(objs, "ConfigMap", kube.TRUST_ROOTS)
    assert cm["data"]["ca-bundle.crt"] == home.bundle_crt.read_text()
    (secret,) = find(objs, "Secret", kube.ISSUER_SECRET)
    assert base64.b64decode(secret["data"]["tls.crt"]) == home.issuer_crt.read_bytes()
    assert base64.b64decode(secret["data"]["tls.key"]) == home.issuer_key.read_bytes()


def _error(r: Any) -> str:
    lines = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_bad_certificates_are_refused(home: MeshHome, tmp_path: Path) -> None:
    other = make_home(tmp_path / "other")
    leaf_chain, leaf_key = ca.self_issue(ca.identity_name("web", "default"), *home.issuer(),
                                         dt.datetime.now(dt.timezone.utc))
    leaf = tmp_path / "leaf.crt"
    leaf.write_bytes(leaf_chain)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    cases = [
        ({"--identity-issuer-certificate-file": other.issuer_crt, "--identity-issuer-key-file": other.issuer_key},
         "the issuer certificate is not signed by the trust anchors"),
        ({"--identity-issuer-key-file": other.issuer_key}, "the issuer key does not match the issuer certificate"),
        ({"--identity-trust-anchors-file": leaf}, "is not a CA certificate"),
        ({"--identity-issuer-certificate-file": leaf}, "the issuer certificate is not a CA certificate"),
        ({"--identity-trust-anchors-file": garbage}, "holds no PEM certificate"),
        ({"--identity-issuer-key-file": garbage}, "--identity-issuer-key-file: not an unencrypted ECDSA PEM key"),
        ({"--identity-issuer-key-file": tmp_path / "missing.key"}, "--identity-issuer-key-file"),
    ]
    for override, message in cases:
        flags = ca_flags(home)
        for flag, path in override.items():
            flags[flags.index(flag) + 1] = str(path)
        r = run("install", *flags)
        assert r.exit_code == 2, (override, r.stdout[:200])
        assert message in _error(r), override
        assert r.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--identity-trust-anchors-file", "/nonexistent/anchors.pem"], "give all three"),
    (["--namespace", "Bad_NS"], "is not a DNS-1123 label"),
    (["--image", ""], "is not an image reference"),
])
def test_bad_flags(args: list[str], message: str) -> None:
    r = run("install", *args)
    assert r.exit_code == 2 and message in _error(r)


def test_crds_alone() -> None:
    objs = install("--crds")
    assert [o["kind"] for o in objs] == ["CustomResourceDefinition"]
    assert objs[0]["metadata"]["name"] == "authorizationpolicies.policy.micromesh.io"
    assert objs == find(install(), "CustomResourceDefinition")


def test_uninstall_lists_every_installed_object() -> None:
    r = run("uninstall")
    assert r.exit_code == 0
    refs = [d for d in yaml.safe_load_all(r.stdout) if d]
    installed = {(o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in install("--ha")}
    listed = {(o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in refs}
    assert listed == installed
    assert refs[0]["kind"] == "MutatingWebhookConfiguration"     # first: pods are never held up
    assert refs[-1]["kind"] == "CustomResourceDefinition"
    for ref in refs:
        assert set(ref) == {"apiVersion", "kind", "metadata"} and "data" not in ref


# === the image ===

def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert any("apt-get install" in line and "iptables" in line for line in lines)
    assert any(line.startswith("RUN pip install") and " ." in line for line in lines)
    assert "--uid 2102" in text
    assert "USER 2102" in lines
    assert lines[-1] == 'CMD ["python", "-m", "microproxy"]'
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignore and "tests" in ignore


BASE_IMAGE = "python:3.11-slim"


def test_podman_build() -> None:
    """Builds the image where that is possible offline: podman installed and the base image
    already in local storage (no image registry is reachable here). ``--pull=never`` keeps
    podman from trying one; the RUN steps reach Debian's and PyPI's package servers."""
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman is not installed (apt-get install podman runc)")
    exists = subprocess.run([podman, "image", "exists", BASE_IMAGE], capture_output=True, timeout=60)
    if exists.returncode != 0:
        pytest.skip(f"the base image {BASE_IMAGE} is not in local storage and no image registry is "
                    "reachable: build it where one is, with `podman build -t micromesh:dev .`")
    p = subprocess.run([podman, "build", "--pull=never", "-t", "micromesh:test", str(ROOT)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = subprocess.run([podman, "run", "--rm", "micromesh:test", "python", "-c",
                          "import os, microproxy, identity, destination; print(os.getuid())"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "2102", out.stderr
