"""``microproxy init`` (``python -m microproxy.init``): the init container's program.

Writes the nat-table rules linkerd2-proxy-init writes (REFERENCE-linkerd §6), so that a
pod's TCP goes through its proxy without the app knowing:

    PREROUTING -> MICROMESH_INBOUND    (Linkerd: PROXY_INIT_REDIRECT)
        -p tcp -m multiport --dports <inbound ports to ignore>   -j RETURN
        -p tcp                                                   -j REDIRECT --to-ports 4143
    OUTPUT     -> MICROMESH_OUTBOUND   (Linkerd: PROXY_INIT_OUTPUT)
        -m owner --uid-owner <proxy uid>                         -j RETURN
        -o lo                                                    -j RETURN
        -p tcp -m multiport --dports <outbound ports to ignore>  -j RETURN
        -d <subnet to ignore>                                    -j RETURN
        -p tcp                                                   -j REDIRECT --to-ports 4140

Every rule carries a ``-m comment --comment "micromesh/..."`` so ``iptables-save`` explains
itself. The proxy finds where a redirected connection was going with SO_ORIGINAL_DST
(``microproxy.netutil.original_dst``).

Theory of operation
-------------------
- **Pure planning, then acting.** ``chain_rules(opts, family)`` is the rule set (argv
  tails); ``install_commands`` / ``cleanup_commands`` turn it plus the *current* nat table
  (parsed from ``iptables-save -t nat`` by ``parse_nat``) into the exact argv lists to
  run. Only ``main`` runs anything.
- **Idempotent.** Our two chains are created when missing and flushed when present, then
  filled; the jumps from PREROUTING/OUTPUT are appended only when absent (and duplicates
  left by anything else are deleted). Running init twice leaves the same table.
- **Both backends, both families.** ``--iptables-mode nft|legacy`` picks
  ``iptables-nft``/``iptables-legacy`` (and the ip6tables twins). Auto-detection follows
  Kubernetes' iptables-wrapper: the mode that already holds more rules wins, a tie (a
  fresh pod) goes to nft. IPv6 rules are written too when ip6tables works here
  (``--no-ipv6`` to skip; ``--ipv6`` makes its absence an error).
- **Defaults are the injector's.** Inbound ports to ignore default to Linkerd's injected
  ``4190,4191,4567,4568`` (control, admin), outbound to ``4567,4568``; pass an empty
  string to ignore none.

Caveat, kept from Linkerd: ``-o lo -j RETURN`` lets everything routed over loopback
through, i.e. connections to 127.0.0.1/::1 *and to the pod's own addresses* (the
kernel routes those over ``lo``). So an app calling its own pod IP reaches itself
directly, bypassing both its proxies, and the proxy's forward to the app on localhost
is not looped back into it. (Istio instead sends non-127.0.0.1 loopback traffic of the
proxy uid back to inbound; Linkerd does not, nor do we.)

``--dry-run`` runs nothing at all, not even iptables-save: it prints what a fresh pod's
init would run (mode nft unless given; IPv6 when an ip6tables binary is on PATH).
``--cleanup`` deletes our jumps and chains. Exit status: 0 done, 1 an iptables command
failed (its stderr is shown), 2 bad flags (one line on stderr).
"""
from __future__ import annotations

import argparse
import ipaddress
import itertools
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

INBOUND_CHAIN = "MICROMESH_INBOUND"
OUTBOUND_CHAIN = "MICROMESH_OUTBOUND"
JUMPS = (("PREROUTING", INBOUND_CHAIN, "micromesh/install-inbound"),
         ("OUTPUT", OUTBOUND_CHAIN, "micromesh/install-outbound"))

DEFAULT_INCOMING_PROXY_PORT = 4143
DEFAULT_OUTGOING_PROXY_PORT = 4140
DEFAULT_PROXY_UID = 2102
DEFAULT_INBOUND_PORTS_TO_IGNORE = "4190,4191,4567,4568"
DEFAULT_OUTBOUND_PORTS_TO_IGNORE = "4567,4568"
MODES = ("nft", "legacy")
MULTIPORT_SLOTS = 15          # xt_multiport: at most 15 ports per rule, a range counts 2
LEGACY_LOCK_WAIT = "5"        # seconds iptables-legacy waits for the xtables lock
MAX_UID = 2**32 - 2


class InitError(Exception):
    """Init cannot proceed (exit 1 with the message)."""


# === Options ===

@dataclass(frozen=True, slots=True)
class PortRange:
    first: int
    last: int

    @property
    def spec(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"

    @property
    def slots(self) -> int:
        return 1 if self.first == self.last else 2


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def parse_ports(text: str, flag: str) -> tuple[PortRange, ...]:
    """``"4190,4191,8000-8100"`` -> port ranges; ``""`` -> none. Raises ValueError."""
    out: list[PortRange] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            if text.strip():
                raise ValueError(f"{flag}: empty item in {text!r}")
            continue
        lo, dash, hi = item.partition("-")
        if not _digits(lo) or (dash and not _digits(hi)):
            raise ValueError(f"{flag}: bad port {item!r} (want N or A-B)")
        first, last = int(lo), int(hi) if dash else int(lo)
        if not (1 <= first <= 65535 and 1 <= last <= 65535):
            raise ValueError(f"{flag}: port {item!r} is outside 1-65535")
        if first > last:
            raise ValueError(f"{flag}: range {item!r} runs backwards")
        out.append(PortRange(first, last))
    return tuple(out)


Subnet = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_subnets(text: str, flag: str) -> tuple[Subnet, ...]:
    out: list[Subnet] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            if text.strip():
                raise ValueError(f"{flag}: empty item in {text!r}")
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=True))
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Options:
    incoming_proxy_port: int = DEFAULT_INCOMING_PROXY_PORT
    outgoing_proxy_port: int = DEFAULT_OUTGOING_PROXY_PORT
    proxy_uid: int = DEFAULT_PROXY_UID
    inbound_ports_to_ignore: tuple[PortRange, ...] = parse_ports(DEFAULT_INBOUND_PORTS_TO_IGNORE, "")
    outbound_ports_to_ignore: tuple[PortRange, ...] = parse_ports(DEFAULT_OUTBOUND_PORTS_TO_IGNORE, "")
    subnets_to_ignore: tuple[Subnet, ...] = ()


@dataclass(frozen=True, slots=True)
class Backend:
    """One iptables binary pair: family 4 or 6, mode nft or legacy."""

    family: int
    mode: str

    @property
    def iptables(self) -> str:
        return f"{'ip6tables' if self.family == 6 else 'iptables'}-{self.mode}"

    @property
    def save(self) -> str:
        return f"{self.iptables}-save"

    @property
    def label(self) -> str:
        return f"IPv{self.family} via {self.iptables}"

    def command(self, *args: str) -> list[str]:
        wait = ["-w", LEGACY_LOCK_WAIT] if self.mode == "legacy" else []
        return [self.iptables, *wait, "-t", "nat", *args]


# === Rules (pure) ===

def _comment(text: str) -> list[str]:
    return ["-m", "comment", "--comment", text]


def _multiport(ports: Sequence[PortRange]) -> list[list[str]]:
    """Port specs chunked to what one ``-m multiport --dports`` takes."""
    chunks: list[list[str]] = []
    cur: list[str] = []
    used = 0
    for p in ports:
        if used + p.slots > MULTIPORT_SLOTS:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(p.spec)
        used += p.slots
    if cur:
        chunks.append(cur)
    return [["-p", "tcp", "-m", "multiport", "--dports", ",".join(c)] for c in chunks]


def chain_rules(opts: Options, family: int = 4) -> list[list[str]]:
    """The ``-A CHAIN ...`` argv tails that fill our two chains, in order."""
    rules: list[list[str]] = []
    for match in _multiport(opts.inbound_ports_to_ignore):
        rules.append(["-A", INBOUND_CHAIN, *match, *_comment("micromesh/ignore-inbound-ports"),
                      "-j", "RETURN"])
    rules.append(["-A", INBOUND_CHAIN, "-p", "tcp", *_comment("micromesh/redirect-inbound-to-proxy"),
                  "-j", "REDIRECT", "--to-ports", str(opts.incoming_proxy_port)])
    rules.append(["-A", OUTBOUND_CHAIN, "-m", "owner", "--uid-owner", str(opts.proxy_uid),
                  *_comment("micromesh/ignore-proxy-uid"), "-j", "RETURN"])
    rules.append(["-A", OUTBOUND_CHAIN, "-o", "lo", *_comment("micromesh/ignore-loopback"),
                  "-j", "RETURN"])
    for match in _multiport(opts.outbound_ports_to_ignore):
        rules.append(["-A", OUTBOUND_CHAIN, *match, *_comment("micromesh/ignore-outbound-ports"),
                      "-j", "RETURN"])
    for net in opts.subnets_to_ignore:
        if net.version == family:
            rules.append(["-A", OUTBOUND_CHAIN, "-d", str(net),
                          *_comment("micromesh/ignore-subnets"), "-j", "RETURN"])
    rules.append(["-A", OUTBOUND_CHAIN, "-p", "tcp", *_comment("micromesh/redirect-outbound-to-proxy"),
                  "-j", "REDIRECT", "--to-ports", str(opts.outgoing_proxy_port)])
    return rules


@dataclass(frozen=True, slots=True)
class NatState:
    """The nat table as iptables-save printed it: chain names, and each chain's rules
    (the text after ``-A CHAIN``) in order."""

    chains: frozenset[str] = frozenset()
    rules: dict[str, list[str]] = field(default_factory=dict)

    def jump_positions(self, parent: str, chain: str) -> list[int]:
        """1-based positions of the rules in ``parent`` that jump to ``chain``."""
        out = []
        for i, rule in enumerate(self.rules.get(parent, []), start=1):
            try:
                words = shlex.split(rule)
            except ValueError:
                words = rule.split()
            if any(w == "-j" and nxt == chain for w, nxt in itertools.pairwise(words)):
                out.append(i)
        return out


def parse_nat(save_text: str) -> NatState:
    """Parse ``iptables-save -t nat`` output (only the ``*nat`` table is read)."""
    chains: set[str] = set()
    rules: dict[str, list[str]] = {}
    table = None
    for line in save_text.splitlines():
        line = line.strip()
        if line.startswith("*"):
            table = line[1:]
        elif table != "nat" or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            name = line[1:].split()[0]
            chains.add(name)
            rules.setdefault(name, [])
        elif line.startswith("-A "):
            _, name, *rest = line.split(" ", 2)
            rules.setdefault(name, []).append(rest[0] if rest else "")
    return NatState(frozenset(chains), rules)


def install_commands(opts: Options, backend: Backend, state: NatState) -> list[list[str]]:
    """argv lists that make the nat table hold exactly our rules, from ``state``."""
    cmds: list[list[str]] = []
    for chain in (INBOUND_CHAIN, OUTBOUND_CHAIN):
        cmds.append(backend.command("-F" if chain in state.chains else "-N", chain))
    cmds += [backend.command(*rule) for rule in chain_rules(opts, backend.family)]
    for parent, chain, comment in JUMPS:
        positions = state.jump_positions(parent, chain)
        if not positions:
            cmds.append(backend.command("-A", parent, *_comment(comment), "-j", chain))
        for pos in reversed(positions[1:]):  # duplicates: keep the first, delete from the end
            cmds.append(backend.command("-D", parent, str(pos)))
    return cmds


def cleanup_commands(backend: Backend, state: NatState) -> list[list[str]]:
    """argv lists that remove our jumps and chains (nothing when there are none)."""
    cmds: list[list[str]] = []
    for parent, chain, _ in JUMPS:
        for pos in reversed(state.jump_positions(parent, chain)):
            cmds.append(backend.command("-D", parent, str(pos)))
    for chain in (INBOUND_CHAIN, OUTBOUND_CHAIN):
        if chain in state.chains:
            cmds.append(backend.command("-F", chain))
            cmds.append(backend.command("-X", chain))
    return cmds


# === Acting ===

Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def run_command(argv: list[str]) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def _count_rules(run: Runner, mode: str) -> int:
    n = 0
    for save in (f"iptables-{mode}-save", f"ip6tables-{mode}-save"):
        if shutil.which(save) is None:
            continue
        try:
            out = run([save])
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0:
            n += sum(1 for line in out.stdout.splitlines() if line.startswith("-"))
    return n


def detect_mode(run: Runner) -> str:
    """nft or legacy: the one whose binaries exist; if both, the one holding more rules
    (Kubernetes' iptables-wrapper heuristic), nft on a tie."""
    have = [m for m in MODES if shutil.which(f"iptables-{m}") and shutil.which(f"iptables-{m}-save")]
    if not have:
        raise InitError("no iptables-nft or iptables-legacy found on PATH (apt-get install iptables)")
    if len(have) == 1:
        return have[0]
    return "legacy" if _count_rules(run, "legacy") > _count_rules(run, "nft") else "nft"


def _ipv6_works(run: Runner, backend: Backend) -> str | None:
    """None when ip6tables can read its nat table here, else why not."""
    if shutil.which(backend.iptables) is None or shutil.which(backend.save) is None:
        return f"{backend.iptables} not found"
    try:
        out = run([backend.save, "-t", "nat"])
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    if out.returncode != 0:
        return (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[0]
    return None


def _read_state(run: Runner, backend: Backend) -> tuple[NatState, str]:
    out = _check(run, [backend.save, "-t", "nat"])
    return parse_nat(out), out


def _check(run: Runner, argv: list[str]) -> str:
    try:
        out = run(argv)
    except (OSError, subprocess.SubprocessError) as e:
        raise InitError(f"{shlex.join(argv)}: {e}") from None
    if out.returncode != 0:
        msg = " ".join(out.stderr.split()) or f"exit {out.returncode}"
        raise InitError(f"{shlex.join(argv)} failed: {msg}")
    return out.stdout


def _table_text(save_text: str) -> str:
    """iptables-save output without its timestamped comment lines."""
    return "\n".join(line for line in save_text.splitlines() if not line.startswith("#"))


def _families(args: argparse.Namespace, mode: str, run: Runner, dry_run: bool,
              err: Callable[[str], None]) -> list[Backend]:
    backends = [Backend(4, mode)]
    if args.ipv6 is False:
        return backends
    v6 = Backend(6, mode)
    if dry_run:
        why = None if shutil.which(v6.iptables) else f"{v6.iptables} not found"
    else:
        why = _ipv6_works(run, v6)
    if why is None:
        backends.append(v6)
    elif args.ipv6:
        raise InitError(f"--ipv6: ip6tables unusable: {why}")
    else:
        err(f"# IPv6 skipped: {why}")
    return backends


# === CLI ===

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _port_arg(text: str) -> int:
    if not _digits(text) or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"bad port {text!r} (want 1-65535)")
    return int(text)


def _uid_arg(text: str) -> int:
    if not _digits(text) or int(text) > MAX_UID:
        raise argparse.ArgumentTypeError(f"bad uid {text!r}")
    return int(text)


def _parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Write the nat rules that send a pod's TCP through its "
                "proxy (inbound -> --incoming-proxy-port, outbound -> --outgoing-proxy-port).")
    p.add_argument("--incoming-proxy-port", type=_port_arg, default=DEFAULT_INCOMING_PROXY_PORT,
                   help="where inbound TCP is redirected (default 4143)")
    p.add_argument("--outgoing-proxy-port", type=_port_arg, default=DEFAULT_OUTGOING_PROXY_PORT,
                   help="where outbound TCP is redirected (default 4140)")
    p.add_argument("--proxy-uid", type=_uid_arg, default=DEFAULT_PROXY_UID,
                   help="the proxy's uid, whose own connections are not redirected (default 2102)")
    p.add_argument("--inbound-ports-to-ignore", default=DEFAULT_INBOUND_PORTS_TO_IGNORE,
                   metavar="PORTS", help="comma list of ports and ranges A-B not redirected "
                   f"inbound (default {DEFAULT_INBOUND_PORTS_TO_IGNORE}; '' for none)")
    p.add_argument("--outbound-ports-to-ignore", default=DEFAULT_OUTBOUND_PORTS_TO_IGNORE,
                   metavar="PORTS", help="comma list of ports and ranges not redirected "
                   f"outbound (default {DEFAULT_OUTBOUND_PORTS_TO_IGNORE}; '' for none)")
    p.add_argument("--subnets-to-ignore", default="", metavar="CIDRS",
                   help="comma list of destination networks not redirected outbound")
    v6 = p.add_mutually_exclusive_group()
    v6.add_argument("--ipv6", dest="ipv6", action="store_true", default=None,
                    help="also write ip6tables rules; fail if ip6tables does not work")
    v6.add_argument("--no-ipv6", dest="ipv6", action="store_false",
                    help="IPv4 only (default: IPv6 too when ip6tables works)")
    p.add_argument("--iptables-mode", choices=MODES, default=None,
                   help="iptables backend (default: detect; nft unless legacy holds more rules)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the commands for a fresh pod; run nothing")
    p.add_argument("--cleanup", action="store_true",
                   help="remove micromesh's chains and the jumps to them")
    return p


def options_from_args(args: argparse.Namespace) -> Options:
    """Raises ValueError with a one-line message."""
    return Options(
        incoming_proxy_port=args.incoming_proxy_port,
        outgoing_proxy_port=args.outgoing_proxy_port,
        proxy_uid=args.proxy_uid,
        inbound_ports_to_ignore=parse_ports(args.inbound_ports_to_ignore, "--inbound-ports-to-ignore"),
        outbound_ports_to_ignore=parse_ports(args.outbound_ports_to_ignore, "--outbound-ports-to-ignore"),
        subnets_to_ignore=parse_subnets(args.subnets_to_ignore, "--subnets-to-ignore"),
    )


def main(argv: Sequence[str] | None = None, prog: str = "microproxy init",
         run: Runner = run_command) -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    try:
        opts = options_from_args(args)
    except ValueError as e:
        parser.error(str(e))

    def out(line: str) -> None:
        print(line, flush=True)

    def err(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        mode = args.iptables_mode or ("nft" if args.dry_run else detect_mode(run))
        for backend in _families(args, mode, run, args.dry_run, err):
            if args.dry_run:
                out(f"# {prog} --dry-run: {backend.label} (nothing run; a fresh table assumed)")
                state = NatState()
                cmds = (cleanup_commands(backend, state) if args.cleanup
                        else install_commands(opts, backend, state))
                for cmd in cmds:
                    out(shlex.join(cmd))
                continue
            state, _ = _read_state(run, backend)
            cmds = cleanup_commands(backend, state) if args.cleanup else install_commands(opts, backend, state)
            out(f"# {prog}{' --cleanup' if args.cleanup else ''}: {backend.label}")
            for cmd in cmds:
                out(shlex.join(cmd))
                _check(run, cmd)
            _, after = _read_state(run, backend)
            out(f"# nat table now ({backend.save} -t nat):")
            out(_table_text(after))
    except InitError as e:
        err(f"{prog}: error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m microproxy.init"))
