"""python -m identity: parse flags, load the issuer from the mesh home, serve /v1/certify."""
from __future__ import annotations

import datetime as dt
import sys

import uvloop

from microproxy import tls

from . import ca
from .server import (SERVING_CERT_LIFETIME, Certifier, SetupError, control_plane_args, handler, load_issuer,
                     run_until_signalled, setup_logging, wall_clock)
from .store import MeshHome


def main(argv: list[str] | None = None) -> int:
    parser = control_plane_args("python -m identity",
                                "The micromesh identity service: signs proxy CSRs (POST /v1/certify).")
    parser.add_argument("--leaf-lifetime", type=float, default=ca.LEAF_LIFETIME.total_seconds(),
                        help="lifetime of issued leaf certificates in seconds (default 86400)")
    args = parser.parse_args(argv)
    if args.leaf_lifetime <= 0:
        parser.error("--leaf-lifetime must be positive")
    setup_logging(args.log_level)
    home = MeshHome(args.home)
    try:
        issuer, issuer_key = load_issuer(home)
        secret, trust = home.secret(), home.trust_pem()
    except (SetupError, OSError) as e:
        parser.exit(2, f"identity: error: {e}\n")
    certifier = Certifier(secret, issuer, issuer_key, args.trust_domain,
                          dt.timedelta(seconds=args.leaf_lifetime))
    chain, key = ca.self_issue(ca.identity_name("identity", "micromesh", args.trust_domain),
                               issuer, issuer_key, wall_clock(), SERVING_CERT_LIFETIME)
    ctx = tls.server_context(chain, key, trust)
    try:
        uvloop.run(run_until_signalled(handler(certifier, wall_clock), args.host, args.port, ctx,
                                       args.ports_file))
    except OSError as e:  # e.g. the port is taken
        parser.exit(1, f"identity: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
