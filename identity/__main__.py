"""python -m identity: parse flags, load the issuer from the mesh home, serve /v1/certify."""
from __future__ import annotations

import datetime as dt
import os
import sys

import uvloop

from . import ca
from .rotation import Reloader
from .server import (Certifier, SetupError, control_plane_args, handler, load_issuer,
                     run_until_signalled, setup_logging, wall_clock)
from .store import MeshHome
from .tokenreview import TokenReviewValidator, Validator


def main(argv: list[str] | None = None) -> int:
    parser = control_plane_args("python -m identity",
                                "The micromesh identity service: signs proxy CSRs (POST /v1/certify).")
    parser.add_argument("--leaf-lifetime", type=float, default=ca.LEAF_LIFETIME.total_seconds(),
                        help="lifetime of issued leaf certificates in seconds (default 86400)")
    parser.add_argument("--clock-skew", type=float, default=ca.CLOCK_SKEW.total_seconds(),
                        help="leaves are valid this many seconds before and after their lifetime "
                             "(default 20; tests with short lifetimes use ~1)")
    parser.add_argument("--token-validator", choices=["local", "tokenreview"], default="local",
                        help="who proves a proxy's token: the mesh home's HMAC secret (local, the "
                             "default) or the Kubernetes API server's TokenReview (audience "
                             "identity.micromesh.io)")
    from destination.k8s_config import add_kube_args, cluster_config  # the shared --kube-* flags
    add_kube_args(parser)
    args = parser.parse_args(argv)
    if args.leaf_lifetime <= 0:
        parser.error("--leaf-lifetime must be positive")
    if args.clock_skew < 0:
        parser.error("--clock-skew must not be negative")
    setup_logging(args.log_level)
    home = MeshHome(args.home)
    try:
        issuer, issuer_key = load_issuer(home)
        validator: Validator | None = None
        if args.token_validator == "tokenreview":
            from destination.k8s_watch import APIClient
            validator = TokenReviewValidator(APIClient(cluster_config(args, os.environ)))
            secret = os.urandom(32)  # never used: no local token is honoured in this mode
        else:
            secret = home.secret()
    except (SetupError, OSError) as e:
        parser.exit(2, f"identity: error: {e}\n")
    certifier = Certifier(secret, issuer, issuer_key, args.trust_domain,
                          dt.timedelta(seconds=args.leaf_lifetime),
                          skew=dt.timedelta(seconds=args.clock_skew))
    # Follows the CA files (issuer/anchor rotation): serving cert, issuer and trust bundle.
    try:
        reloader = Reloader(home, ca.identity_name("identity", "micromesh", args.trust_domain),
                            certifier=certifier, clock=wall_clock)
    except (OSError, ValueError) as e:
        parser.exit(2, f"identity: error: {e}\n")
    try:
        uvloop.run(run_until_signalled(handler(certifier, wall_clock, validator), args.host, args.port,
                                       reloader.context, args.ports_file, background=[reloader.watch]))
    except OSError as e:  # e.g. the port is taken
        parser.exit(1, f"identity: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
