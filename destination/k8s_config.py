"""Command-line flags that point a control-plane process at the Kubernetes API server,
shared by ``python -m destination --source kubernetes`` and ``python -m identity
--token-validator tokenreview``.

By default the process is in a pod: ``ClusterConfig.in_cluster(os.environ)`` (the
``KUBERNETES_SERVICE_HOST``/``_PORT`` variables and the mounted ServiceAccount token and
CA). ``--kube-api https://HOST:PORT`` (with ``--kube-token-file``/``--kube-ca-file``)
points it elsewhere — the tests use that against their fake API server; the two file
flags alone override the in-cluster files.
"""
from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from .k8s_watch import SA_DIR, ClusterConfig, ConfigError


def add_kube_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Kubernetes API (default: the in-cluster ServiceAccount)")
    g.add_argument("--kube-api", default=None, metavar="URL",
                   help="API server URL, https://HOST:PORT (default: KUBERNETES_SERVICE_HOST/PORT)")
    g.add_argument("--kube-token-file", type=Path, default=None, metavar="FILE",
                   help=f"bearer token file, re-read per request (default {SA_DIR / 'token'})")
    g.add_argument("--kube-ca-file", type=Path, default=None, metavar="FILE",
                   help=f"CA bundle the API server's certificate must chain to (default {SA_DIR / 'ca.crt'})")


def parse_api_url(url: str) -> tuple[str, int]:
    """``https://HOST[:PORT]`` -> (host, port). Raises ConfigError."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise ConfigError(f"--kube-api must be https://HOST[:PORT], not {url!r}")
    try:
        port = parts.port or 443
    except ValueError:
        raise ConfigError(f"bad port in --kube-api {url!r}") from None
    host = parts.hostname
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        pass
    return host, port


def cluster_config(args: argparse.Namespace, env: Mapping[str, str]) -> ClusterConfig:
    """The ClusterConfig the flags ask for; checks that the token and CA files are usable.
    Raises ConfigError (an OSError)."""
    if args.kube_api:
        host, port = parse_api_url(args.kube_api)
        cfg = ClusterConfig(host, port, args.kube_token_file or SA_DIR / "token",
                            args.kube_ca_file or SA_DIR / "ca.crt")
    else:
        cfg = ClusterConfig.in_cluster(env)
        if args.kube_token_file or args.kube_ca_file:
            cfg = ClusterConfig(cfg.host, cfg.port, args.kube_token_file or cfg.token_path,
                                args.kube_ca_file or cfg.ca_path, cfg.namespace)
    cfg.ssl_context()   # fail at start, not at the first request
    cfg.bearer()
    return cfg
