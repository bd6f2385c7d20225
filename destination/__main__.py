"""python -m destination: parse flags, load the saved registry, serve discovery over mTLS."""
from __future__ import annotations

import asyncio
import sys
import time

import uvloop

from identity import ca
from identity.rotation import Reloader
from identity.server import (SetupError, control_plane_args, load_issuer, run_until_signalled,
                             setup_logging, wall_clock)
from identity.store import MeshHome

from .server import DEFAULT_LEASE_TTL, Destination, Settings, load_registry
from . import webhook
from . import k8s_source


def main(argv: list[str] | None = None) -> int:
    parser = control_plane_args("python -m destination",
                                "The micromesh destination service: workload registry and "
                                "endpoint discovery (mTLS required).")
    parser.add_argument("--lease-ttl", type=float, default=DEFAULT_LEASE_TTL,
                        help="seconds a registration lives without renewal (default 3)")
    k8s_source.add_args(parser)   # --source local|kubernetes, --kube-* (destination/k8s_source.py)
    webhook.add_args(parser)   # --webhook-port/-cert/-key: POST /v1/inject (destination/webhook.py)
    args = parser.parse_args(argv)
    if args.lease_ttl <= 0:
        parser.error("--lease-ttl must be positive")
    setup_logging(args.log_level)
    home = MeshHome(args.home)
    try:
        load_issuer(home)
        # Follows the CA files (issuer/anchor rotation): serving cert and client trust.
        reloader = Reloader(home, ca.identity_name("destination", "micromesh", args.trust_domain),
                            require_client_cert=True, clock=wall_clock)
        webhook_tasks = webhook.from_args(args, home)
    except (SetupError, OSError, ValueError) as e:
        parser.exit(2, f"destination: error: {e}\n")
    settings = Settings(lease_ttl=args.lease_ttl, state_path=home.destination_state)
    if args.source == "kubernetes":  # endpoints from the API server; its watcher runs as reap_forever
        try:
            dest = k8s_source.from_args(args, settings, clock=time.monotonic, sleep=asyncio.sleep)
        except (OSError, ValueError) as e:
            parser.exit(2, f"destination: error: {e}\n")
    else:
        registry = load_registry(settings.state_path, time.monotonic(), args.trust_domain)
        dest = Destination(registry, settings, clock=time.monotonic, sleep=asyncio.sleep)
    try:
        uvloop.run(run_until_signalled(dest.handle, args.host, args.port, reloader.context,
                                       args.ports_file, background=[dest.reap_forever, reloader.watch, *webhook_tasks],
                                       on_stop=dest.close))
    except OSError as e:  # e.g. the port is taken
        parser.exit(1, f"destination: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
