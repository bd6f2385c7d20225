"""`mesh inject` and the injection transform (destination/inject.py): every workload kind,
annotation and --manual modes, overrides and their validation, skips and reports. Every
injected manifest must pass kubernetes-validate in strict mode."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from cli.main import cli
from destination import inject as tx
from identity.store import MeshHome
from microproxy.config import Config
from tests.controlplane_helpers import make_home

kubernetes_validate = pytest.importorskip("kubernetes_validate")

DATA = Path(__file__).parent / "testdata" / "k8s"
WORKLOADS = DATA / "workloads"
KUBE_VERSION = "1.32.0"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> MeshHome:
    return make_home(tmp_path_factory.mktemp("inject") / "mesh")


def run(*args: str, home: MeshHome | None = None, stdin: str | None = None) -> Any:
    argv = (["--home", str(home.root)] if home else []) + list(args)
    return CliRunner().invoke(cli, argv, input=stdin, catch_exceptions=False)


def manual(home: MeshHome, *paths: str, stdin: str | None = None) -> Any:
    return run("inject", "--manual", "--identity-trust-anchors-file", str(home.trust_file()), *paths,
               stdin=stdin)


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def validate(obj: dict[str, Any]) -> None:
    if obj["kind"] == "List":
        for item in obj["items"]:
            validate(item)
        return
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def template_of(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "Pod":
        return obj
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return obj["spec"]["template"]


def container(tmpl: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in tmpl["spec"]["initContainers"] if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


# === --manual over every workload kind ===

def test_manual_injects_every_workload_kind_and_output_is_schema_valid(home: MeshHome) -> None:
    for src in sorted(WORKLOADS.glob("*.yaml")):
        kubernetes_validate_input = docs(src.read_text())
        for d in kubernetes_validate_input:
            validate(d)   # the samples themselves are valid manifests
    r = manual(home, str(WORKLOADS))
    assert r.exit_code == 0, r.stderr
    out = docs(r.stdout)
    kinds = {d["kind"] for d in out}
    assert kinds == {"Deployment", "Service", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod", "ReplicaSet"}
    for d in out:
        validate(d)
        if d["kind"] == "Service":
            assert 'service "web-svc" skipped: not a workload' in r.stderr
            continue
        tmpl = template_of(d)
        names = [c["name"] for c in tmpl["spec"]["initContainers"]]
        assert names[:2] == ["micromesh-init", "micromesh-proxy"], d["metadata"]["name"]
        assert f'{d["kind"].lower()} "{d["metadata"]["name"]}" injected' in r.stderr
    # the app's own init container still runs, after the proxy is up
    rs = next(d for d in out if d["kind"] == "ReplicaSet")
    assert [c["name"] for c in rs["spec"]["template"]["spec"]["initContainers"]] == \
        ["micromesh-init", "micromesh-proxy", "wait-for-db"]
    # a CronJob's template is jobTemplate.spec.template
    cron = next(d for d in out if d["kind"] == "CronJob")
    assert container(template_of(cron), "micromesh-proxy")["resources"] == {"limits": {"memory": "128Mi"}}


def test_injected_pod_shape(home: MeshHome) -> None:
    r = manual(home, str(WORKLOADS / "web.yaml"))
    assert r.exit_code == 0, r.stderr
    dep = docs(r.stdout)[0]
    tmpl = dep["spec"]["template"]
    meta = tmpl["metadata"]
    assert meta["labels"]["micromesh.io/control-plane-ns"] == "micromesh"
    assert meta["labels"]["micromesh.io/proxy-deployment"] == "web"
    assert meta["labels"]["app"] == "web-svc"     # the selector still matches
    ann = meta["annotations"]
    assert ann["micromesh.io/proxy-version"] and ann["micromesh.io/created-by"].startswith("micromesh/cli ")
    import hashlib
    assert ann["micromesh.io/trust-root-sha256"] == hashlib.sha256(home.trust_pem()).hexdigest()

    init = container(tmpl, "micromesh-init")
    assert init["command"] == ["python", "-m", "microproxy.init"]
    assert init["args"] == ["--incoming-proxy-port", "4143", "--outgoing-proxy-port", "4140",
                            "--proxy-uid", "2102", "--inbound-ports-to-ignore", "4190,4191"]
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    assert init["securityContext"]["runAsUser"] == 0
    assert "restartPolicy" not in init

    proxy = container(tmpl, "micromesh-proxy")
    assert proxy["restartPolicy"] == "Always"       # a native sidecar
    assert proxy["command"] == ["python", "-m", "microproxy"]
    assert {p["containerPort"] for p in proxy["ports"]} == {4143, 4191}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 4191}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/live", "port": 4191}
    sc = proxy["securityContext"]
    assert (sc["runAsUser"], sc["runAsNonRoot"], sc["readOnlyRootFilesystem"], sc["allowPrivilegeEscalation"]) == \
        (2102, True, True, False)
    assert "resources" not in proxy                  # only from annotations
    env = env_of(proxy)
    assert env["MESH_IDENTITY_ADDR"] == "identity.micromesh.svc.cluster.local:8080"
    assert env["MESH_DESTINATION_ADDR"] == "destination.micromesh.svc.cluster.local:8086"
    assert env["MESH_TRUST_ANCHORS"] == home.trust_pem().decode()
    assert env["MESH_TOKEN_FILE"] == "/var/run/secrets/tokens/micromesh-identity-token"
    assert env["MESH_WORKLOAD"] == "web"
    assert env["MESH_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert (env["MESH_INBOUND_ADDR"], env["MESH_OUTBOUND_ADDR"], env["MESH_ADMIN_ADDR"], env["MESH_REGISTER"]) == \
        ("0.0.0.0:4143", "127.0.0.1:4140", "0.0.0.0:4191", "0")

    vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
    token = vols["micromesh-identity-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token == {"audience": "identity.micromesh.io", "expirationSeconds": 86400,
                     "path": "micromesh-identity-token"}
    mounts = {m["mountPath"] for m in proxy["volumeMounts"]}
    assert "/var/run/secrets/tokens" in mounts


def test_proxy_env_is_what_the_proxy_reads(home: MeshHome, tmp_path: Path) -> None:
    """The injected MESH_* variables, with the downward API and the token volume filled in
    as the kubelet would, make a valid microproxy Config."""
    r = manual(home, str(DATA / "overrides.yaml"))
    assert r.exit_code == 0, r.stderr
    proxy = container(docs(r.stdout)[0]["spec"]["template"], "micromesh-proxy")
    token = tmp_path / "token"
    token.write_text("eyJhbGciOi.fake.jwt\n")
    downward = {"metadata.namespace": "payments", "spec.serviceAccountName": "billing",
                "metadata.name": "billing-5f7d9c-abcde", "status.podIP": "10.244.0.7"}
    env = {}
    for e in proxy["env"]:
        env[e["name"]] = e["value"] if "value" in e else downward[e["valueFrom"]["fieldRef"]["fieldPath"]]
    env["MESH_TOKEN_FILE"] = str(token)
    cfg = Config.from_env(env)
    assert cfg.identity == "billing.payments.serviceaccount.identity.cluster.local"
    assert cfg.identity_addr == ("identity.micromesh.svc.cluster.local", 8080)
    assert cfg.inbound_addr == ("0.0.0.0", 4143) and cfg.outbound_addr == ("127.0.0.1", 4140)
    assert cfg.admin_addr == ("0.0.0.0", 4191)
    assert cfg.register is False
    assert cfg.instance == "billing-5f7d9c-abcde" and cfg.advertise_host == "10.244.0.7"
    assert cfg.workload == "billing" and cfg.token == "eyJhbGciOi.fake.jwt"
    assert cfg.log_level == "info" and cfg.default_inbound_policy == "all-authenticated"
    assert cfg.shutdown_grace == 90.0
    assert cfg.trust_pem == home.trust_pem()


def test_overrides(home: MeshHome) -> None:
    r = manual(home, str(DATA / "overrides.yaml"))
    assert r.exit_code == 0, r.stderr
    tmpl = docs(r.stdout)[0]["spec"]["template"]
    validate(docs(r.stdout)[0])
    init = container(tmpl, "micromesh-init")
    assert init["args"][-4:] == ["--inbound-ports-to-ignore", "4190,4191,9090,9100-9102",
                                 "--outbound-ports-to-ignore", "3306"]
    proxy = container(tmpl, "micromesh-proxy")
    assert proxy["resources"] == {"requests": {"cpu": "100m", "memory": "32Mi"},
                                  "limits": {"cpu": "1", "memory": "256Mi"}}
    env = env_of(proxy)
    assert env["MESH_OPAQUE_PORTS"] == "5432,6379"
    assert env["MESH_SHUTDOWN_GRACE_PERIOD"] == "90"


# === annotation mode (the default) ===

def test_default_adds_only_the_annotation() -> None:
    r = run("inject", str(WORKLOADS / "web.yaml"))
    assert r.exit_code == 0, r.stderr
    before, after = docs((WORKLOADS / "web.yaml").read_text()), docs(r.stdout)
    assert after[0]["spec"]["template"]["metadata"]["annotations"] == {"micromesh.io/inject": "enabled"}
    after[0]["spec"]["template"]["metadata"].pop("annotations")
    assert after == before
    assert r.stderr.splitlines() == ['deployment "web" injected', 'service "web-svc" skipped: not a workload']


def test_default_annotates_namespaces_and_every_kind() -> None:
    r = run("inject", str(DATA / "namespace.yaml"), str(WORKLOADS))
    assert r.exit_code == 0, r.stderr
    out = docs(r.stdout)
    assert out[0]["metadata"]["annotations"] == {"micromesh.io/inject": "enabled"}
    assert 'namespace "emojivoto" annotated' in r.stderr
    for d in out[1:]:
        validate(d)
        if d["kind"] != "Service":
            assert template_of(d)["metadata"]["annotations"]["micromesh.io/inject"] == "enabled"
            assert "initContainers" not in template_of(d)["spec"] or d["kind"] == "ReplicaSet"


# === idempotence, skips, notes ===

def test_injecting_twice_changes_nothing(home: MeshHome, tmp_path: Path) -> None:
    once = manual(home, str(WORKLOADS / "web.yaml"))
    f = tmp_path / "once.yaml"
    f.write_text(once.stdout)
    twice = manual(home, str(f))
    assert twice.exit_code == 0
    assert docs(twice.stdout) == docs(once.stdout)
    assert 'deployment "web" skipped: already injected' in twice.stderr
    annotated = run("inject", str(f))          # the annotation is not added to an injected pod
    assert docs(annotated.stdout) == docs(once.stdout)
    assert 'deployment "web" skipped: already injected' in annotated.stderr


def test_host_network_is_skipped_and_udp_noted(home: MeshHome) -> None:
    r = manual(home, str(DATA / "hostnetwork-udp.yaml"))
    assert r.exit_code == 0, r.stderr
    out = docs(r.stdout)
    assert out[0] == docs((DATA / "hostnetwork-udp.yaml").read_text())[0]
    assert 'daemonset "node-agent" skipped: hostNetwork: true' in r.stderr
    assert 'deployment "dns-cache": UDP ports are not proxied: 53/UDP' in r.stderr
    assert 'deployment "dns-cache" injected' in r.stderr


def test_disabled_pod_is_skipped(home: MeshHome) -> None:
    dep = docs((WORKLOADS / "web.yaml").read_text())[0]
    dep["spec"]["template"]["metadata"]["annotations"] = {"micromesh.io/inject": "disabled"}
    r = manual(home, "-", stdin=yaml.safe_dump(dep))
    assert r.exit_code == 0
    assert docs(r.stdout)[0] == dep
    assert r.stderr.strip() == 'deployment "web" skipped: micromesh.io/inject: disabled on the pod'


def test_list_stdin_and_json(home: MeshHome) -> None:
    text = (DATA / "list.yaml").read_text()
    r = manual(home, "-", stdin=text)
    assert r.exit_code == 0, r.stderr
    (lst,) = docs(r.stdout)
    assert lst["kind"] == "List"
    validate(lst)
    assert container(lst["items"][0]["spec"]["template"], "micromesh-proxy")
    assert r.stderr.splitlines() == ['deployment "books" injected',
                                     'configmap "books-config" skipped: not a workload']
    r = manual(home, "-", stdin=json.dumps(yaml.safe_load(text)))
    assert r.exit_code == 0 and docs(r.stdout) == [lst]


# === the transform's rules, directly ===

CFG = tx.InjectConfig(trust_anchors_pem=b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p", "annotations": annotations or {}},
            "spec": {"containers": [{"name": "app", "image": "app:1"}], **spec}}


@pytest.mark.parametrize("pod_ann, ns_ann, injected", [
    ({}, {}, False),
    ({"micromesh.io/inject": "enabled"}, {}, True),
    ({}, {"micromesh.io/inject": "enabled"}, True),
    ({"micromesh.io/inject": "disabled"}, {"micromesh.io/inject": "enabled"}, False),   # the pod wins
    ({"micromesh.io/inject": "enabled"}, {"micromesh.io/inject": "disabled"}, True),    # the pod wins
    ({}, {"micromesh.io/inject": "disabled"}, False),
])
def test_opt_in(pod_ann: dict[str, str], ns_ann: dict[str, str], injected: bool) -> None:
    result = tx.inject_pod(pod(pod_ann), tx.Owner("pod", "p"), CFG, namespace_annotations=ns_ann,
                           require_opt_in=True)
    assert result.injected is injected


def test_namespace_overrides_apply_and_the_pods_win() -> None:
    ns = {"micromesh.io/inject": "enabled", "config.micromesh.io/proxy-log-level": "debug",
          "config.micromesh.io/proxy-cpu-request": "50m"}
    r = tx.inject_pod(pod({"config.micromesh.io/proxy-log-level": "error"}), tx.Owner("pod", "p"), CFG,
                      namespace_annotations=ns, require_opt_in=True)
    proxy = r.template["spec"]["initContainers"][1]
    assert env_of(proxy)["MESH_LOG_LEVEL"] == "error"
    assert proxy["resources"] == {"requests": {"cpu": "50m"}}


BAD = [
    ("skip-inbound-ports", "80,abc"), ("skip-inbound-ports", "0"), ("skip-outbound-ports", "70000"),
    ("skip-outbound-ports", "9000-8000"), ("opaque-ports", ""), ("opaque-ports", "5432,,6379"),
    ("proxy-cpu-request", "lots"), ("proxy-cpu-limit", "-1"), ("proxy-cpu-limit", "0"),
    ("proxy-memory-request", "64MB"), ("proxy-memory-limit", "100m"),
    ("proxy-log-level", "loud"), ("default-inbound-policy", "allow"),
    ("shutdown-grace-period", "soon"), ("shutdown-grace-period", "0s"), ("shutdown-grace-period", "48h"),
]


@pytest.mark.parametrize("key, value", BAD)
def test_bad_override_names_the_annotation(key: str, value: str) -> None:
    with pytest.raises(tx.InjectError, match=f"^config.micromesh.io/{key}: "):
        tx.inject_pod(pod({f"config.micromesh.io/{key}": value}), tx.Owner("pod", "p"), CFG)


@pytest.mark.parametrize("key, value, expected", [
    ("skip-inbound-ports", " 25, 587 ,4000-4010", "25,587,4000-4010"),
    ("shutdown-grace-period", "1m30s", 90.0), ("shutdown-grace-period", "500ms", 0.5),
    ("shutdown-grace-period", "45", 45.0), ("proxy-memory-limit", "1Gi", "1Gi"),
    ("proxy-cpu-limit", "1.5", "1.5"), ("proxy-cpu-request", "2e-1", "2e-1"),
])
def test_good_override_values(key: str, value: str, expected: Any) -> None:
    overrides, _ = tx.parse_overrides({f"config.micromesh.io/{key}": value})
    field = tx.OVERRIDES[key][0]
    assert getattr(overrides, field) == expected


def test_request_above_limit_and_bad_opt_in_are_errors() -> None:
    with pytest.raises(tx.InjectError, match="proxy-memory-request: '512Mi' is above"):
        tx.parse_overrides({"config.micromesh.io/proxy-memory-request": "512Mi",
                            "config.micromesh.io/proxy-memory-limit": "256Mi"})
    with pytest.raises(tx.InjectError, match="^micromesh.io/inject: 'yes'"):
        tx.inject_pod(pod({"micromesh.io/inject": "yes"}), tx.Owner("pod", "p"), CFG)


def test_unknown_config_annotation_is_a_note() -> None:
    r = tx.inject_pod(pod({"config.micromesh.io/proxy-cpu-requests": "1"}), tx.Owner("pod", "p"), CFG)
    assert r.injected and "unknown annotation config.micromesh.io/proxy-cpu-requests ignored" in r.notes[0]


def test_input_is_not_modified() -> None:
    p = pod({"micromesh.io/inject": "enabled"})
    before = json.dumps(p, sort_keys=True)
    tx.inject_pod(p, tx.Owner("pod", "p"), CFG)
    assert json.dumps(p, sort_keys=True) == before


@pytest.mark.parametrize("meta, owner", [
    ({"name": "x", "labels": {"pod-template-hash": "7d9c8f6b5d"},
      "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7d9c8f6b5d", "controller": True}]},
     tx.Owner("deployment", "web")),
    ({"ownerReferences": [{"kind": "ReplicaSet", "name": "legacy", "controller": True}]},
     tx.Owner("replicaset", "legacy")),
    ({"ownerReferences": [{"kind": "StatefulSet", "name": "db", "controller": True}]}, tx.Owner("statefulset", "db")),
    ({"ownerReferences": [{"kind": "Job", "name": "nightly-report-2951", "controller": True}]},
     tx.Owner("job", "nightly-report-2951")),
    ({"name": "debug-7f9", "labels": {"app.kubernetes.io/name": "debug", "app": "x"}}, tx.Owner("app", "debug")),
    ({"name": "debug-7f9", "labels": {"app": "x"}}, tx.Owner("app", "x")),
    ({"generateName": "debug-"}, tx.Owner("pod", "debug")),
    ({"name": "debug"}, tx.Owner("pod", "debug")),
])
def test_owner_of(meta: dict[str, Any], owner: tx.Owner) -> None:
    assert tx.owner_of({"metadata": meta}) == owner


# === CLI errors: one line, non-zero ===

@pytest.mark.parametrize("args, stdin, code, message", [
    (["inject", "/nonexistent.yaml"], None, 1, "Error: /nonexistent.yaml: no such file or directory"),
    (["inject", "-"], "kind: [unclosed", 1, "Error: <stdin>: not valid YAML (line 1)"),
    (["inject", "-"], "just a string\n", 1, "Error: a document is not a Kubernetes object (no kind)"),
    (["inject", str(DATA / "invalid" / "bad-annotation.yaml")], None, 1,
     "Error: deployment \"greedy\": config.micromesh.io/proxy-cpu-request: 'lots' is not a Kubernetes quantity"),
    (["inject", "--image", "bad image", "-"], "", 2, "Error: Invalid value for '--image'"),
])
def test_errors_are_one_line(args: list[str], stdin: str | None, code: int, message: str) -> None:
    r = run(*args, stdin=stdin)
    assert r.exit_code == code
    lines = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr
    assert "Traceback" not in r.stderr


def test_manual_needs_trust_anchors(tmp_path: Path) -> None:
    r = run("--home", str(tmp_path / "empty"), "inject", "--manual", str(WORKLOADS / "web.yaml"))
    assert r.exit_code == 2
    assert "--manual needs the mesh's trust anchors" in r.stderr


def test_manual_uses_the_mesh_home_bundle(home: MeshHome) -> None:
    r = run("inject", "--manual", str(WORKLOADS / "web.yaml"), home=home)
    assert r.exit_code == 0, r.stderr
    proxy = container(docs(r.stdout)[0]["spec"]["template"], "micromesh-proxy")
    assert env_of(proxy)["MESH_TRUST_ANCHORS"] == home.trust_pem().decode()


def test_init_container_command_is_what_proxy_init_accepts(home: MeshHome) -> None:
    """The injected init container's exact command line, run with --dry-run (which runs no
    iptables command): microproxy.init accepts it and plans the skipped ports."""
    import importlib.util
    import subprocess
    import sys
    if importlib.util.find_spec("microproxy.init") is None:
        pytest.skip("microproxy.init is not in this tree")
    r = manual(home, str(DATA / "overrides.yaml"))
    init = container(docs(r.stdout)[0]["spec"]["template"], "micromesh-init")
    assert init["command"][0] == "python"
    p = subprocess.run([sys.executable, *init["command"][1:], *init["args"], "--dry-run"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "--dports 4190,4191,9090,9100:9102" in p.stdout
    assert "--uid-owner 2102" in p.stdout and "--to-ports 4143" in p.stdout and "--to-ports 4140" in p.stdout
    assert "--dports 3306" in p.stdout


def test_owner_of_agrees_with_discovery() -> None:
    """MESH_WORKLOAD (the proxy's metrics label) and the workload label destination's
    Kubernetes source gives the same pod's endpoints are the same name."""
    import importlib.util
    if importlib.util.find_spec("destination.k8s") is None:
        pytest.skip("destination.k8s is not in this tree")
    from destination import k8s
    review = json.loads((DATA / "admission-review-web-pod.json").read_text())
    pods = [review["request"]["object"],
            {"metadata": {"name": "debug-7f9", "labels": {"app": "x"}}},
            {"metadata": {"name": "db-0", "ownerReferences": [{"kind": "StatefulSet", "name": "db", "controller": True}]}},
            {"metadata": {"name": "solo"}}]
    for p in pods:
        owner = tx.owner_of(p)
        assert (owner.kind, owner.name) == k8s.workload_of(p)
