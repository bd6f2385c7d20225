"""The proxy-injector webhook (destination/webhook.py): real AdmissionReview JSON over a real
HTTPS connection; the returned JSONPatch is applied (RFC 6902, applier below) and the result
must equal `mesh inject --manual` of the same pod and pass kubernetes-validate strict.

Also runs `python -m destination` with the exact arguments of the Deployment that
`mesh install` prints, its CA files and webhook certificate taken from the printed
ConfigMap and Secrets, and calls it as the API server would: HTTPS to
destination.micromesh.svc, trusting the webhook configuration's caBundle."""
from __future__ import annotations

import asyncio
import base64
import copy
import datetime as dt
import json
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner

from cli import install as kube
from cli.main import cli
from destination import inject as tx
from destination import webhook
from identity.store import MeshHome
from microproxy import ctlhttp
from tests.controlplane_helpers import make_home, running, start_component

kubernetes_validate = pytest.importorskip("kubernetes_validate")

DATA = Path(__file__).parent / "testdata" / "k8s"
REVIEW = json.loads((DATA / "admission-review-web-pod.json").read_text())
KUBE_VERSION = "1.32.0"


# === a tiny RFC 6902 applier (add, remove, replace; what the webhook emits) ===

def _tokens(path: str) -> list[str]:
    assert path == "" or path.startswith("/"), path
    return [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]


def apply_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    doc = copy.deepcopy(doc)
    for op in ops:
        tokens = _tokens(op["path"])
        if not tokens:
            assert op["op"] == "replace"
            doc = copy.deepcopy(op["value"])
            continue
        parent = doc
        for t in tokens[:-1]:
            parent = parent[int(t)] if isinstance(parent, list) else parent[t]
        last = tokens[-1]
        if isinstance(parent, list):
            if op["op"] == "add":
                parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            elif op["op"] == "remove":
                del parent[int(last)]
            else:
                parent[int(last)] = copy.deepcopy(op["value"])
        else:
            if op["op"] in ("add", "replace"):
                assert op["op"] == "add" or last in parent, op
                parent[last] = copy.deepcopy(op["value"])
            else:
                del parent[last]
    return doc


def patch_of(answer: dict[str, Any]) -> list[dict[str, Any]]:
    resp = answer["response"]
    assert resp["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(resp["patch"]))


@pytest.mark.parametrize("old, new", [
    ({"a": 1}, {"a": 1, "b/c": {"x": [1]}}),
    ({"a": 1, "b": 2}, {"a": 3}),
    ({"l": [1, 2]}, {"l": [0, 1, 2, 3]}),
    ({"l": [1, 2]}, {"l": [2, 1]}),
    ({"m": {"k~/": 1}}, {"m": {"k~/": 2}}),
    ([1], {"a": 1}),
])
def test_json_patch_round_trips(old: Any, new: Any) -> None:
    assert apply_patch(old, webhook.json_patch(old, new)) == new


def test_json_patch_escapes_keys_and_inserts_list_items() -> None:
    ops = webhook.json_patch({"labels": {}, "l": [{"n": "app"}]},
                             {"labels": {"micromesh.io/x": "1"}, "l": [{"n": "init"}, {"n": "app"}]})
    assert ops == [{"op": "add", "path": "/labels/micromesh.io~1x", "value": "1"},
                   {"op": "add", "path": "/l/0", "value": {"n": "init"}}]


# === a webhook served over real HTTPS in this process ===

@pytest.fixture(scope="module")
def pki() -> dict[str, bytes]:
    now = dt.datetime.now(dt.timezone.utc)
    wca, wkey = webhook.new_ca(now)
    chain, key = webhook.serving_cert(webhook.service_dns_names("destination", "micromesh"), wca, wkey, now)
    from identity import ca
    return {"ca": ca.cert_pem(wca), "chain": chain, "key": key}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> MeshHome:
    return make_home(tmp_path_factory.mktemp("webhook") / "mesh")


def config_for(home: MeshHome) -> tx.InjectConfig:
    return tx.InjectConfig(trust_anchors_pem=home.trust_pem(), created_by=webhook.CREATED_BY)


def post_reviews(pki: dict[str, bytes], home: MeshHome, bodies: list[bytes],
                 lookup: webhook.NamespaceLookup | None = None) -> list[httpx.Response]:
    """Serve the webhook on 127.0.0.1 with server-only TLS; POST each body over HTTPS,
    verifying the server as destination.micromesh.svc against the webhook CA."""
    async def main() -> list[httpx.Response]:
        hook = webhook.Webhook(lambda: config_for(home), lookup)
        server = await ctlhttp.serve(hook.handle, "127.0.0.1", 0,
                                     ssl=webhook.server_context(pki["chain"], pki["key"]),
                                     max_body=webhook.MAX_REVIEW)
        port = server.sockets[0].getsockname()[1]
        verify = ssl.create_default_context(cadata=pki["ca"].decode())
        try:
            # The API server dials the Service name; resolve it to our listener.
            transport = httpx.AsyncHTTPTransport(verify=verify)
            async with httpx.AsyncClient(transport=transport, timeout=10) as client:
                out = []
                for body in bodies:
                    out.append(await client.post(
                        f"https://127.0.0.1:{port}/v1/inject?timeout=10s", content=body,
                        headers={"content-type": "application/json"},
                        extensions={"sni_hostname": "destination.micromesh.svc"}))
                return out
        finally:
            server.close()
            await server.wait_closed()
    return asyncio.run(main())


def mesh_inject_manual(home: MeshHome, obj: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    f = tmp_path / "pod.yaml"
    f.write_text(yaml.safe_dump(obj))
    r = CliRunner().invoke(cli, ["inject", "--manual", "--identity-trust-anchors-file",
                                 str(home.trust_file()), str(f)], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    (out,) = [d for d in yaml.safe_load_all(r.stdout) if d]
    return out


def test_review_over_https_patch_equals_mesh_inject_manual(pki: dict[str, bytes], home: MeshHome,
                                                           tmp_path: Path) -> None:
    (resp,) = post_reviews(pki, home, [json.dumps(REVIEW).encode()])
    assert resp.status_code == 200
    answer = resp.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == REVIEW["request"]["uid"]
    assert answer["response"]["allowed"] is True
    pod = REVIEW["request"]["object"]
    patched = apply_patch(pod, patch_of(answer))
    kubernetes_validate.validate(patched, KUBE_VERSION, strict=True)

    manual = mesh_inject_manual(home, pod, tmp_path)
    kubernetes_validate.validate(manual, KUBE_VERSION, strict=True)
    # The one difference: who injected (as linkerd.io/created-by says linkerd/cli or proxy-injector).
    assert patched["metadata"]["annotations"].pop("micromesh.io/created-by").startswith("micromesh/proxy-injector")
    assert manual["metadata"]["annotations"].pop("micromesh.io/created-by").startswith("micromesh/cli")
    assert patched == manual

    # The pod of the Deployment carries what `mesh inject --manual` puts in its template.
    dep = mesh_inject_manual(home, yaml.safe_load((DATA / "workloads" / "web.yaml").read_text().split("---")[0]),
                             tmp_path)
    tmpl = dep["spec"]["template"]["spec"]
    assert patched["spec"]["initContainers"] == tmpl["initContainers"]
    assert patched["spec"]["volumes"][1:] == tmpl["volumes"]
    assert patched["metadata"]["labels"]["micromesh.io/proxy-deployment"] == "web"


def review_with(mutate: Callable[[dict[str, Any]], None]) -> bytes:
    r = copy.deepcopy(REVIEW)
    mutate(r)
    return json.dumps(r).encode()


def test_opt_in_through_the_namespace_and_not_at_all(pki: dict[str, bytes], home: MeshHome) -> None:
    def no_annotation(r: dict[str, Any]) -> None:
        del r["request"]["object"]["metadata"]["annotations"]

    def disabled(r: dict[str, Any]) -> None:
        r["request"]["object"]["metadata"]["annotations"] = {"micromesh.io/inject": "disabled"}

    lookups = {"emojivoto": {"micromesh.io/inject": "enabled"}}
    plain, via_ns, pod_disabled = post_reviews(
        pki, home, [review_with(no_annotation)] * 2 + [review_with(disabled)], lookup=None)
    assert plain.json()["response"] == {"uid": REVIEW["request"]["uid"], "allowed": True}
    assert via_ns.json()["response"] == {"uid": REVIEW["request"]["uid"], "allowed": True}
    assert pod_disabled.json()["response"]["allowed"] is True and "patch" not in pod_disabled.json()["response"]

    via_ns, pod_disabled = post_reviews(pki, home, [review_with(no_annotation), review_with(disabled)],
                                        lookup=lookups.get)
    assert "patch" in via_ns.json()["response"]
    patched = apply_patch(REVIEW["request"]["object"] | {"metadata": {
        k: v for k, v in REVIEW["request"]["object"]["metadata"].items() if k != "annotations"}},
        patch_of(via_ns.json()))
    kubernetes_validate.validate(patched, KUBE_VERSION, strict=True)
    assert "patch" not in pod_disabled.json()["response"]     # the pod's annotation wins


def test_refusals_and_malformed_reviews(pki: dict[str, bytes], home: MeshHome) -> None:
    def bad_annotation(r: dict[str, Any]) -> None:
        r["request"]["object"]["metadata"]["annotations"]["config.micromesh.io/proxy-memory-limit"] = "lots"

    def no_uid(r: dict[str, Any]) -> None:
        del r["request"]["uid"]

    def not_a_pod(r: dict[str, Any]) -> None:
        r["request"]["object"] = {"kind": "Pod", "apiVersion": "v1", "metadata": {}}

    def no_containers(r: dict[str, Any]) -> None:
        r["request"]["object"]["spec"]["containers"] = []

    bodies = [review_with(bad_annotation), review_with(no_uid), review_with(not_a_pod),
              review_with(no_containers), b"{not json", b'"a string"', b'{"kind": "AdmissionReview"}',
              json.dumps({**REVIEW, "apiVersion": "admission.k8s.io/v1beta1"}).encode()]
    answers = post_reviews(pki, home, bodies)
    messages = []
    for resp in answers:
        assert resp.status_code == 200
        body = resp.json()
        assert body["kind"] == "AdmissionReview" and body["response"]["allowed"] is False
        assert "patch" not in body["response"]
        msg = body["response"]["status"]["message"]
        assert msg.startswith("micromesh proxy-injector: ") and "\n" not in msg and "Traceback" not in msg
        messages.append(msg)
    assert "config.micromesh.io/proxy-memory-limit: 'lots'" in messages[0]
    assert answers[0].json()["response"]["uid"] == REVIEW["request"]["uid"]
    assert "request.uid is missing" in messages[1]
    assert "not a Pod" in messages[2]
    assert "spec.containers" in messages[3]
    assert "not JSON" in messages[4]


def test_other_kinds_operations_and_injected_pods_pass_untouched(pki: dict[str, bytes], home: MeshHome) -> None:
    def update(r: dict[str, Any]) -> None:
        r["request"]["operation"] = "UPDATE"

    def service(r: dict[str, Any]) -> None:
        r["request"]["kind"] = {"group": "", "version": "v1", "kind": "Service"}

    first = post_reviews(pki, home, [json.dumps(REVIEW).encode()])[0].json()
    injected = apply_patch(REVIEW["request"]["object"], patch_of(first))

    def already(r: dict[str, Any]) -> None:
        r["request"]["object"] = injected

    for resp in post_reviews(pki, home, [review_with(update), review_with(service), review_with(already)]):
        assert resp.json()["response"] == {"uid": REVIEW["request"]["uid"], "allowed": True}


def test_udp_ports_come_back_as_warnings(pki: dict[str, bytes], home: MeshHome) -> None:
    def udp(r: dict[str, Any]) -> None:
        r["request"]["object"]["spec"]["containers"][0]["ports"].append({"containerPort": 53, "protocol": "UDP"})
    (resp,) = post_reviews(pki, home, [review_with(udp)])
    assert resp.json()["response"]["warnings"] == ["micromesh: UDP ports are not proxied: 53/UDP"]


def test_no_plaintext_and_no_tls_below_1_2(pki: dict[str, bytes]) -> None:
    ctx = webhook.server_context(pki["chain"], pki["key"])
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE     # the API server presents no client certificate


# === python -m destination --webhook-port, as `mesh install` runs it ===

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _https_review(port: int, cadata: str, body: bytes, server_name: str) -> dict[str, Any]:
    ctx = ssl.create_default_context(cadata=cadata)
    transport = httpx.HTTPTransport(verify=ctx)
    with httpx.Client(transport=transport, timeout=10) as client:
        resp = client.post(f"https://127.0.0.1:{port}/v1/inject", content=body,
                           extensions={"sni_hostname": server_name})
        assert resp.status_code == 200, resp.text
        ready = client.get(f"https://127.0.0.1:{port}/ready", extensions={"sni_hostname": server_name})
        assert ready.status_code == 200
        return resp.json()


def test_destination_serves_the_webhook_as_installed(tmp_path: Path) -> None:
    """The install's manifests, played by hand: files from the ConfigMap and Secrets laid out
    as the projected volumes do, and the Deployment's own args (paths and ports local)."""
    opts = kube.InstallOptions()
    now = dt.datetime.now(dt.timezone.utc)
    objs = kube.manifests(opts, kube.generate_certs(opts, now))
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    home = MeshHome(tmp_path / "home")
    (home.root / "ca").mkdir(parents=True)
    (home.root / "webhook").mkdir()
    cm = by[("ConfigMap", kube.TRUST_ROOTS)]["data"]["ca-bundle.crt"]
    issuer = {k: base64.b64decode(v) for k, v in by[("Secret", kube.ISSUER_SECRET)]["data"].items()}
    tls_secret = {k: base64.b64decode(v) for k, v in by[("Secret", kube.WEBHOOK_SECRET)]["data"].items()}
    for src in by[("Deployment", "destination")]["spec"]["template"]["spec"]["volumes"][1]["projected"]["sources"]:
        data = ({"ca-bundle.crt": cm.encode()} if "configMap" in src else issuer)
        for item in (src.get("configMap") or src.get("secret"))["items"]:
            (home.root / "ca" / item["path"]).write_bytes(data[item["key"]])
    for name in ("tls.crt", "tls.key"):
        (home.root / "webhook" / name).write_bytes(tls_secret[name])

    (container,) = by[("Deployment", "destination")]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "destination"]
    port = _free_port()
    # No API server here: the kubernetes source is swapped for the local one (the webhook
    # does not depend on where endpoints come from).
    assert kube.DESTINATION_KUBE_ARGS == ["--source", "kubernetes"]
    args = local_args(container["args"], {
        "--source": "local",
        "--home": str(home.root), "--host": "127.0.0.1", "--webhook-port": str(port),
        "--webhook-cert": str(home.root / "webhook" / "tls.crt"),
        "--webhook-key": str(home.root / "webhook" / "tls.key")})
    ca_bundle = base64.b64decode(by[("MutatingWebhookConfiguration", kube.WEBHOOK_CONFIG)]
                                 ["webhooks"][0]["clientConfig"]["caBundle"]).decode()
    with running("destination", home, *args):
        answer = _https_review(port, ca_bundle, json.dumps(REVIEW).encode(), "destination.micromesh.svc")
    assert answer["response"]["allowed"] is True
    patched = apply_patch(REVIEW["request"]["object"], patch_of(answer))
    kubernetes_validate.validate(patched, KUBE_VERSION, strict=True)
    env = {e["name"]: e.get("value") for e in patched["spec"]["initContainers"][1]["env"]}
    assert env["MESH_TRUST_ANCHORS"] == cm              # the installed anchors, from the home
    assert patched["spec"]["initContainers"][1]["image"] == opts.image

    # identity starts from the same files with its Deployment's args, and answers /ready.
    (ident,) = by[("Deployment", "identity")]["spec"]["template"]["spec"]["containers"]
    assert ident["command"] == ["python", "-m", "identity"]
    assert kube.IDENTITY_KUBE_ARGS == ["--token-validator", "tokenreview"]
    with running("identity", home, *local_args(ident["args"], {"--home": str(home.root), "--host": "127.0.0.1",
                                                                "--token-validator": "local"})):
        pass


def local_args(args: list[str], replace: dict[str, str]) -> list[str]:
    """A Deployment's args with paths and addresses made local; ``--port`` is left out
    (start_component passes ``--port 0`` and reads the bound port from its ports file)."""
    out: list[str] = []
    it = iter(args)
    for a in it:
        if a == "--port":
            next(it)
            continue
        out.append(a)
        if a in replace:
            next(it)
            out.append(replace[a])
    return out


def test_destination_webhook_default_cert_is_from_the_mesh_issuer(tmp_path: Path) -> None:
    home = make_home(tmp_path / "mesh")
    port = _free_port()
    dest = start_component("destination", home, "--webhook-port", str(port))
    try:
        answer = _https_review(port, home.trust_pem().decode(), json.dumps(REVIEW).encode(),
                               "destination.micromesh.svc")
        with pytest.raises(httpx.ConnectError):   # the name is checked, not only the CA
            _https_review(port, home.trust_pem().decode(), b"{}", "identity.micromesh.svc")
    finally:
        assert dest.stop() == 0
    assert answer["response"]["allowed"] is True and answer["response"]["patchType"] == "JSONPatch"


def test_destination_refuses_bad_webhook_flags(tmp_path: Path) -> None:
    import subprocess
    import sys
    home = make_home(tmp_path / "mesh")
    bad = tmp_path / "bad.pem"
    bad.write_text("not a cert")
    for extra, message in [(["--webhook-cert", str(bad)], "need --webhook-port"),
                           (["--webhook-port", "0", "--webhook-cert", str(bad)], "both --webhook-cert and --webhook-key"),
                           (["--webhook-port", "0", "--webhook-cert", str(bad), "--webhook-key", str(bad)],
                            "unusable webhook certificate")]:
        p = subprocess.run([sys.executable, "-m", "destination", "--home", str(home.root), "--port", "0", *extra],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, p.stderr
        assert message in p.stderr and "Traceback" not in p.stderr
