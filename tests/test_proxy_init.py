"""``microproxy init``: the pure rule planning (tables), the CLI, and — as root, in network
namespaces this test creates and removes — the real rules and a real redirect.

The redirect test builds two namespaces joined by a veth pair, "pod" (10.123.0.1,
fd00:123::1) where init runs, and "peer" (10.123.0.2, fd00:123::2). All traffic stays
between them (ENVIRONMENT.md: never send to addresses outside the namespaces).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from microproxy import init
from microproxy.init import (Backend, NatState, Options, PortRange, chain_rules, cleanup_commands,
                             install_commands, parse_nat, parse_ports, parse_subnets)

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
PROXY_UID = 2102


# === Pure: parsing flags ===

@pytest.mark.parametrize("text, want", [
    ("", ()),
    ("  ", ()),
    ("80", ((80, 80),)),
    ("4190,4191", ((4190, 4190), (4191, 4191))),
    ("8000-8100, 9000", ((8000, 8100), (9000, 9000))),
    ("1-65535", ((1, 65535),)),
    ("7-7", ((7, 7),)),
])
def test_parse_ports(text: str, want: tuple[tuple[int, int], ...]) -> None:
    assert parse_ports(text, "--x") == tuple(PortRange(a, b) for a, b in want)


@pytest.mark.parametrize("text, error", [
    ("x", "bad port 'x'"),
    ("0", "outside 1-65535"),
    ("65536", "outside 1-65535"),
    ("80,", "empty item"),
    (",80", "empty item"),
    ("9-8", "runs backwards"),
    ("1-", "bad port '1-'"),
    ("-5", "bad port '-5'"),
    ("1-2-3", "bad port '1-2-3'"),
    ("+80", "bad port '+80'"),
    ("\u00b2", "bad port '\u00b2'"),
])
def test_parse_ports_rejects(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        parse_ports(text, "--x")


def test_parse_subnets() -> None:
    nets = parse_subnets("10.0.0.0/8, fd00::/8", "--s")
    assert [str(n) for n in nets] == ["10.0.0.0/8", "fd00::/8"]
    assert parse_subnets("", "--s") == ()
    for bad in ("10.0.0.1/8", "nope", "10.0.0.0/8,"):
        with pytest.raises(ValueError, match="--s"):
            parse_subnets(bad, "--s")


# === Pure: the rules ===

IN, OUT = init.INBOUND_CHAIN, init.OUTBOUND_CHAIN


def _c(text: str) -> list[str]:
    return ["-m", "comment", "--comment", text]


REDIRECT_IN = ["-A", IN, "-p", "tcp", *_c("micromesh/redirect-inbound-to-proxy"), "-j", "REDIRECT", "--to-ports"]
REDIRECT_OUT = ["-A", OUT, "-p", "tcp", *_c("micromesh/redirect-outbound-to-proxy"), "-j", "REDIRECT", "--to-ports"]
LOOPBACK = ["-A", OUT, "-o", "lo", *_c("micromesh/ignore-loopback"), "-j", "RETURN"]


def _uid(uid: int) -> list[str]:
    return ["-A", OUT, "-m", "owner", "--uid-owner", str(uid), *_c("micromesh/ignore-proxy-uid"), "-j", "RETURN"]


def _skip(chain: str, ports: str) -> list[str]:
    what = "inbound" if chain == IN else "outbound"
    return ["-A", chain, "-p", "tcp", "-m", "multiport", "--dports", ports,
            *_c(f"micromesh/ignore-{what}-ports"), "-j", "RETURN"]


RULE_CASES = [
    ("defaults (Linkerd's injected ignores)", Options(), 4, [
        _skip(IN, "4190,4191,4567,4568"), REDIRECT_IN + ["4143"],
        _uid(2102), LOOPBACK, _skip(OUT, "4567,4568"), REDIRECT_OUT + ["4140"]]),
    ("nothing ignored, other ports and uid",
     Options(incoming_proxy_port=5143, outgoing_proxy_port=5140, proxy_uid=999,
             inbound_ports_to_ignore=(), outbound_ports_to_ignore=()), 4, [
        REDIRECT_IN + ["5143"], _uid(999), LOOPBACK, REDIRECT_OUT + ["5140"]]),
    ("ranges use a colon",
     Options(inbound_ports_to_ignore=parse_ports("22,8000-8100", ""),
             outbound_ports_to_ignore=parse_ports("25-26", "")), 4, [
        _skip(IN, "22,8000:8100"), REDIRECT_IN + ["4143"],
        _uid(2102), LOOPBACK, _skip(OUT, "25:26"), REDIRECT_OUT + ["4140"]]),
    ("multiport takes 15 slots per rule; a range counts two",
     Options(inbound_ports_to_ignore=parse_ports(",".join(str(p) for p in range(1, 15)) + ",100-200,300", ""),
             outbound_ports_to_ignore=()), 4, [
        _skip(IN, ",".join(str(p) for p in range(1, 15))), _skip(IN, "100:200,300"),
        REDIRECT_IN + ["4143"], _uid(2102), LOOPBACK, REDIRECT_OUT + ["4140"]]),
    ("subnets of the family only (IPv4)",
     Options(outbound_ports_to_ignore=(), inbound_ports_to_ignore=(),
             subnets_to_ignore=parse_subnets("10.96.0.0/12,fd00::/8", "")), 4, [
        REDIRECT_IN + ["4143"], _uid(2102), LOOPBACK,
        ["-A", OUT, "-d", "10.96.0.0/12", *_c("micromesh/ignore-subnets"), "-j", "RETURN"],
        REDIRECT_OUT + ["4140"]]),
    ("subnets of the family only (IPv6)",
     Options(outbound_ports_to_ignore=(), inbound_ports_to_ignore=(),
             subnets_to_ignore=parse_subnets("10.96.0.0/12,fd00::/8", "")), 6, [
        REDIRECT_IN + ["4143"], _uid(2102), LOOPBACK,
        ["-A", OUT, "-d", "fd00::/8", *_c("micromesh/ignore-subnets"), "-j", "RETURN"],
        REDIRECT_OUT + ["4140"]]),
]


@pytest.mark.parametrize("name, opts, family, want", RULE_CASES, ids=[c[0] for c in RULE_CASES])
def test_chain_rules(name: str, opts: Options, family: int, want: list[list[str]]) -> None:
    assert chain_rules(opts, family) == want


SAVE_WITH_OURS = """\
# Generated by iptables-nft-save v1.8.9 (nf_tables) on Thu Nov 26 02:53:16 2026
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j MICROMESH_INBOUND
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:MICROMESH_INBOUND - [0:0]
:MICROMESH_OUTBOUND - [0:0]
:OTHER - [0:0]
-A PREROUTING -j OTHER
-A PREROUTING -m comment --comment "micromesh/install-inbound" -j MICROMESH_INBOUND
-A OUTPUT -m comment --comment "micromesh/install-outbound" -j MICROMESH_OUTBOUND
-A OUTPUT -p tcp -j OTHER
-A OUTPUT -m comment --comment "a b" -j MICROMESH_OUTBOUND
-A MICROMESH_INBOUND -p tcp -m comment --comment "micromesh/redirect-inbound-to-proxy" -j REDIRECT --to-ports 4143
COMMIT
# Completed on Thu Nov 26 02:53:16 2026
"""


def test_parse_nat_reads_only_the_nat_table() -> None:
    state = parse_nat(SAVE_WITH_OURS)
    assert state.chains == {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING", IN, OUT, "OTHER"}
    assert state.rules["PREROUTING"] == ["-j OTHER", '-m comment --comment "micromesh/install-inbound" -j MICROMESH_INBOUND']
    assert state.jump_positions("PREROUTING", IN) == [2]
    assert state.jump_positions("OUTPUT", OUT) == [1, 3]
    assert state.jump_positions("INPUT", IN) == []  # the filter table's INPUT is not read
    assert parse_nat("") == NatState()


NFT4 = Backend(4, "nft")


def _cmd(*args: str, backend: Backend = NFT4) -> list[str]:
    return backend.command(*args)


def test_install_on_a_fresh_table() -> None:
    cmds = install_commands(Options(), NFT4, NatState())
    assert cmds[:2] == [["iptables-nft", "-t", "nat", "-N", IN], ["iptables-nft", "-t", "nat", "-N", OUT]]
    assert cmds[2:-2] == [["iptables-nft", "-t", "nat", *r] for r in chain_rules(Options())]
    assert cmds[-2:] == [
        _cmd("-A", "PREROUTING", *_c("micromesh/install-inbound"), "-j", IN),
        _cmd("-A", "OUTPUT", *_c("micromesh/install-outbound"), "-j", OUT)]


def test_install_again_flushes_and_adds_no_second_jump() -> None:
    cmds = install_commands(Options(), NFT4, parse_nat(SAVE_WITH_OURS))
    assert cmds[:2] == [_cmd("-F", IN), _cmd("-F", OUT)]
    assert [c for c in cmds if c[3] in ("-A", "-D") and c[4] in ("PREROUTING", "OUTPUT")] == [
        _cmd("-D", "OUTPUT", "3")]  # the duplicate jump goes, the first stays


def test_install_adds_only_the_missing_jump() -> None:
    state = parse_nat(SAVE_WITH_OURS.replace(
        '-A PREROUTING -m comment --comment "micromesh/install-inbound" -j MICROMESH_INBOUND\n', ""))
    jumps = [c for c in install_commands(Options(), NFT4, state) if c[4] in ("PREROUTING", "OUTPUT")]
    assert jumps == [_cmd("-A", "PREROUTING", *_c("micromesh/install-inbound"), "-j", IN),
                     _cmd("-D", "OUTPUT", "3")]


def test_legacy_and_ipv6_binaries() -> None:
    legacy6 = Backend(6, "legacy")
    assert legacy6.iptables == "ip6tables-legacy" and legacy6.save == "ip6tables-legacy-save"
    assert legacy6.command("-N", IN) == ["ip6tables-legacy", "-w", "5", "-t", "nat", "-N", IN]
    assert Backend(4, "legacy").label == "IPv4 via iptables-legacy"


def test_cleanup_deletes_jumps_from_the_end_then_chains() -> None:
    assert cleanup_commands(NFT4, parse_nat(SAVE_WITH_OURS)) == [
        _cmd("-D", "PREROUTING", "2"), _cmd("-D", "OUTPUT", "3"), _cmd("-D", "OUTPUT", "1"),
        _cmd("-F", IN), _cmd("-X", IN), _cmd("-F", OUT), _cmd("-X", OUT)]
    assert cleanup_commands(NFT4, NatState()) == []


# === The CLI (no root needed) ===

def _init(*args: str, module: tuple[str, ...] = ("-m", "microproxy.init"),
          netns: str | None = None) -> subprocess.CompletedProcess[str]:
    pre = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*pre, PY, *module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize("args, message", [
    (["--inbound-ports-to-ignore", "4190,abc"], "--inbound-ports-to-ignore: bad port 'abc'"),
    (["--outbound-ports-to-ignore", "70000"], "--outbound-ports-to-ignore: port '70000' is outside 1-65535"),
    (["--outbound-ports-to-ignore", "9-1"], "range '9-1' runs backwards"),
    (["--incoming-proxy-port", "0"], "--incoming-proxy-port: bad port '0'"),
    (["--outgoing-proxy-port", "http"], "--outgoing-proxy-port: bad port 'http'"),
    (["--proxy-uid", "-1"], "--proxy-uid: bad uid '-1'"),
    (["--iptables-mode", "xtables"], "invalid choice: 'xtables'"),
    (["--ipv6", "--no-ipv6"], "not allowed with argument"),
    (["--subnets-to-ignore", "10.0.0.1/8"], "--subnets-to-ignore: 10.0.0.1/8 has host bits set"),
])
def test_bad_flags_one_line_exit_2(args: list[str], message: str) -> None:
    res = _init(*args, "--dry-run")
    assert res.returncode == 2, res
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m microproxy.init: error: "), res.stderr
    assert message in lines[0]


def test_dry_run_prints_a_fresh_pods_commands() -> None:
    res = _init("--dry-run", "--no-ipv6", "--proxy-uid", "1234")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == ("# python -m microproxy.init --dry-run: IPv4 via iptables-nft "
                        "(nothing run; a fresh table assumed)")
    assert lines[1:3] == [f"iptables-nft -t nat -N {IN}", f"iptables-nft -t nat -N {OUT}"]
    assert ("iptables-nft -t nat -A MICROMESH_OUTBOUND -m owner --uid-owner 1234 -m comment "
            "--comment micromesh/ignore-proxy-uid -j RETURN") in lines
    assert lines[-1] == "iptables-nft -t nat -A OUTPUT -m comment --comment micromesh/install-outbound -j MICROMESH_OUTBOUND"


def test_python_dash_m_microproxy_init_is_the_same_program() -> None:
    a = _init("--dry-run", "--iptables-mode", "legacy", "--no-ipv6")
    b = _init("init", "--dry-run", "--iptables-mode", "legacy", "--no-ipv6", module=("-m", "microproxy"))
    assert a.returncode == b.returncode == 0, (a.stderr, b.stderr)
    assert b.stdout.splitlines()[0].startswith("# microproxy init --dry-run: IPv4 via iptables-legacy")
    assert a.stdout.splitlines()[1:] == b.stdout.splitlines()[1:]
    assert "iptables-legacy -w 5 -t nat -N MICROMESH_INBOUND" in b.stdout
    bad = _init("init", "--proxy-uid", "x", module=("-m", "microproxy"))
    assert bad.returncode == 2 and bad.stderr.startswith("microproxy init: error: ")


def test_a_failing_iptables_command_exits_1_with_its_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        if argv[0].endswith("-save"):
            return subprocess.CompletedProcess(argv, 0, "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n", "")
        return subprocess.CompletedProcess(argv, 4, "", "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)\n")

    assert init.main(["--iptables-mode", "nft", "--no-ipv6"], run=run) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[1] == "iptables-nft -t nat -N MICROMESH_INBOUND"
    assert err == ("microproxy init: error: iptables-nft -t nat -N MICROMESH_INBOUND failed: iptables "
                   "v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied "
                   "(you must be root)\n")


# === For real: network namespaces (root) ===

def _why_no_netns() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root (ip netns, iptables)"
    if shutil.which("ip") is None:
        return "ip (iproute2) is not installed"
    for tool in ("iptables-nft", "iptables-legacy", "iptables-nft-save", "iptables-legacy-save"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install -y iptables)"
    probe = f"mm-probe-{secrets.token_hex(3)}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return f"ip netns unavailable: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


_NO_NETNS = _why_no_netns()
needs_netns = pytest.mark.skipif(_NO_NETNS is not None, reason=str(_NO_NETNS))


def _sh(*argv: str) -> str:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr}"
    return res.stdout


@pytest.fixture
def netns() -> Iterator[list[str]]:
    """A list to append namespace names to (``_add_ns``); all of them are deleted after."""
    made: list[str] = []
    try:
        yield made
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


def _add_ns(made: list[str], suffix: str = "") -> str:
    name = f"mm-test-{secrets.token_hex(3)}{suffix}"
    _sh("ip", "netns", "add", name)
    made.append(name)
    _sh("ip", "-n", name, "link", "set", "lo", "up")
    return name


def _ipv6_in(ns: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", ns, "ip6tables-nft-save", "-t", "nat"],
                          capture_output=True, check=False).returncode == 0


def _ours(save_text: str) -> list[str]:
    """The lines of a nat dump that are micromesh's (chains, rules, jumps)."""
    return [line for line in save_text.splitlines() if "MICROMESH" in line]


def expected_lines(uid: int = PROXY_UID) -> list[str]:
    return [
        f":{IN} - [0:0]",
        f":{OUT} - [0:0]",
        f'-A PREROUTING -m comment --comment "micromesh/install-inbound" -j {IN}',
        f'-A OUTPUT -m comment --comment "micromesh/install-outbound" -j {OUT}',
        f'-A {IN} -p tcp -m multiport --dports 4190,4191,4567,4568 -m comment --comment "micromesh/ignore-inbound-ports" -j RETURN',
        f'-A {IN} -p tcp -m comment --comment "micromesh/redirect-inbound-to-proxy" -j REDIRECT --to-ports 4143',
        f'-A {OUT} -m owner --uid-owner {uid} -m comment --comment "micromesh/ignore-proxy-uid" -j RETURN',
        f'-A {OUT} -o lo -m comment --comment "micromesh/ignore-loopback" -j RETURN',
        f'-A {OUT} -p tcp -m multiport --dports 4567,4568 -m comment --comment "micromesh/ignore-outbound-ports" -j RETURN',
        f'-A {OUT} -p tcp -m comment --comment "micromesh/redirect-outbound-to-proxy" -j REDIRECT --to-ports 4140',
    ]


def _dump(ns: str, save: str) -> str:
    return _sh("ip", "netns", "exec", ns, save, "-t", "nat")


@needs_netns
@pytest.mark.parametrize("mode", ["nft", "legacy"])
def test_init_writes_the_rules_idempotently_and_cleans_up(netns: list[str], mode: str) -> None:
    ns = _add_ns(netns)
    v6 = _ipv6_in(ns)
    saves = [f"iptables-{mode}-save"] + ([f"ip6tables-{mode}-save"] if v6 else [])
    flags = ["--iptables-mode", mode]
    for run in (1, 2):
        res = _init(*flags, netns=ns)
        assert res.returncode == 0, res.stderr
        for save in saves:
            assert _ours(_dump(ns, save)) == expected_lines(), f"run {run}, {save}"
    assert f"-t nat -F {IN}" in res.stdout and f"-t nat -N {IN}" not in res.stdout  # 2nd run flushed
    assert (f"# python -m microproxy.init: IPv6 via ip6tables-{mode}" in res.stdout) == v6
    assert "# nat table now" in res.stdout and '"micromesh/install-outbound"' in res.stdout

    # a jump someone duplicated is removed again; the first stays
    _sh("ip", "netns", "exec", ns, f"iptables-{mode}", "-t", "nat", "-A", "OUTPUT", "-j", OUT)
    assert _init(*flags, netns=ns).returncode == 0
    assert _ours(_dump(ns, saves[0])) == expected_lines()

    res = _init(*flags, "--cleanup", netns=ns)
    assert res.returncode == 0, res.stderr
    for save in saves:
        assert _ours(_dump(ns, save)) == []
    assert _init(*flags, "--cleanup", netns=ns).returncode == 0  # nothing left: still fine


@needs_netns
def test_mode_detection_prefers_nft_unless_legacy_holds_more_rules(netns: list[str]) -> None:
    fresh = _add_ns(netns)
    res = _init("--no-ipv6", netns=fresh)
    assert res.returncode == 0 and "IPv4 via iptables-nft" in res.stdout, res.stderr
    busy = _add_ns(netns)
    _sh("ip", "netns", "exec", busy, "iptables-legacy", "-t", "filter", "-A", "INPUT", "-j", "ACCEPT")
    res = _init("--no-ipv6", netns=busy)
    assert res.returncode == 0 and "IPv4 via iptables-legacy" in res.stdout, res.stderr
    assert _ours(_dump(busy, "iptables-legacy-save")) == expected_lines()
    assert _ours(_dump(busy, "iptables-nft-save")) == []


# --- a real redirect

LISTENER = r"""
import json, socket, sys, threading
from microproxy.netutil import original_dst

def serve(name, sock):
    while True:
        conn, peer = sock.accept()
        with conn:
            try:
                orig = list(original_dst(conn))
            except OSError as e:
                orig = str(e)
            conn.sendall(json.dumps({"listener": name, "original_dst": orig,
                                     "local": list(conn.getsockname()[:2])}).encode())

for spec in sys.argv[1:]:
    name, host, port = spec.split("@")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, int(port)))
    s.listen(16)
    threading.Thread(target=serve, args=(name, s), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.decode())
"""


def _listen(ns: str, *specs: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", LISTENER, *specs], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"listener in {ns} did not start: {proc.communicate()[1]}")
    return proc


def _as(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def _python_for(uid: int) -> str | None:
    """An interpreter ``uid`` may run (the client is stdlib-only): this venv's when its path
    is reachable by that uid (not, say, under a 0700 /root), else the system's."""
    for cand in dict.fromkeys([PY, os.path.realpath(PY), "/usr/bin/python3"]):
        res = subprocess.run([*_as(uid), cand, "-I", "-c", "pass"], capture_output=True, check=False)
        if res.returncode == 0:
            return cand
    return None


def _connect(ns: str, host: str, port: int, uid: int | None = None) -> dict[str, object]:
    who, py = ([], PY) if uid is None else (_as(uid), _python_for(uid))
    assert py is not None
    res = subprocess.run(["ip", "netns", "exec", ns, *who, py, "-I", "-c", CLIENT, host, str(port)],
                         capture_output=True, text=True, timeout=20, check=False)
    assert res.returncode == 0, f"client in {ns} -> {host}:{port} failed: {res.stderr}"
    reply: dict[str, object] = json.loads(res.stdout)
    return reply


@needs_netns
@pytest.mark.parametrize("mode", ["nft", "legacy"])
def test_redirect_really_happens(netns: list[str], mode: str) -> None:
    pod, peer = _add_ns(netns, "-pod"), _add_ns(netns, "-peer")
    va, vb = f"mmv{secrets.token_hex(3)}a", None
    vb = va[:-1] + "b"
    _sh("ip", "-n", pod, "link", "add", va, "type", "veth", "peer", "name", vb)  # made inside pod
    _sh("ip", "-n", pod, "link", "set", vb, "netns", peer)
    _sh("ip", "-n", pod, "addr", "add", "10.123.0.1/24", "dev", va)
    _sh("ip", "-n", peer, "addr", "add", "10.123.0.2/24", "dev", vb)
    v6 = (_ipv6_in(pod) and subprocess.run(
        ["ip", "-n", pod, "-6", "addr", "add", "fd00:123::1/64", "dev", va, "nodad"],
        capture_output=True, check=False).returncode == 0)
    if v6:
        _sh("ip", "-n", peer, "-6", "addr", "add", "fd00:123::2/64", "dev", vb, "nodad")
    _sh("ip", "-n", pod, "link", "set", va, "up")
    _sh("ip", "-n", peer, "link", "set", vb, "up")

    res = _init("--iptables-mode", mode, *(["--ipv6"] if v6 else ["--no-ipv6"]), netns=pod)
    assert res.returncode == 0, res.stderr
    as_proxy = _python_for(PROXY_UID) is not None

    procs = []
    try:
        procs.append(_listen(pod, "outbound@127.0.0.1@4140", "inbound@0.0.0.0@4143",
                             "app@0.0.0.0@8080", "admin@0.0.0.0@4191",
                             *(["outbound6@::1@4140", "inbound6@::@4143"] if v6 else [])))
        procs.append(_listen(peer, "peer-app@0.0.0.0@8080", "peer-4567@0.0.0.0@4567",
                             *(["peer-app6@::@8080"] if v6 else [])))

        # outbound: the app's connection lands on the proxy's 4140, which reads where it was going
        got = _connect(pod, "10.123.0.2", 8080)
        assert got["listener"] == "outbound" and got["original_dst"] == ["10.123.0.2", 8080], got
        # the proxy's own uid goes out untouched, to the real destination
        if as_proxy:
            assert _connect(pod, "10.123.0.2", 8080, uid=PROXY_UID)["listener"] == "peer-app"
        # an ignored outbound port goes out untouched
        assert _connect(pod, "10.123.0.2", 4567)["listener"] == "peer-4567"
        # the loopback caveat (as Linkerd): the pod's own address is routed over lo, not redirected
        assert _connect(pod, "10.123.0.1", 8080)["listener"] == "app"
        assert _connect(pod, "127.0.0.1", 8080)["listener"] == "app"
        # inbound: a peer's connection to the app port lands on 4143 first
        got = _connect(peer, "10.123.0.1", 8080)
        assert got["listener"] == "inbound" and got["original_dst"] == ["10.123.0.1", 8080], got
        # an ignored inbound port (admin) reaches its listener directly
        assert _connect(peer, "10.123.0.1", 4191)["listener"] == "admin"
        if v6:
            got = _connect(pod, "fd00:123::2", 8080)
            assert got["listener"] == "outbound6" and got["original_dst"] == ["fd00:123::2", 8080], got
            if as_proxy:
                assert _connect(pod, "fd00:123::2", 8080, uid=PROXY_UID)["listener"] == "peer-app6"
            got = _connect(peer, "fd00:123::1", 8080)
            assert got["listener"] == "inbound6" and got["original_dst"] == ["fd00:123::1", 8080], got
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    if not as_proxy:
        pytest.skip(f"everything but the proxy-uid check passed: no python uid {PROXY_UID} may run")
