# The one micromesh image: identity, destination (and its proxy-injector webhook), the
# proxy, and the proxy-init program of the init container.
#
#   podman build -t micromesh:dev .        (or docker build; needs the python:3.11-slim base)
#
#   python -m microproxy          the proxy (default; runs as uid 2102, the uid proxy-init skips)
#   python -m microproxy.init     the init container: nat rules with iptables (runs as root with
#                                 NET_ADMIN/NET_RAW, as the injected securityContext asks)
#   python -m identity | python -m destination   the control plane (uid 2103 in `mesh install`)
#
# Offline machines (no image registry) cannot pull the base image; tests/test_install.py
# builds it with --network=none only when python:3.11-slim is already in local storage.
FROM python:3.11-slim

# iptables (nft and legacy backends) for micromesh-init.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY microproxy ./microproxy
COPY identity ./identity
COPY destination ./destination
COPY cli ./cli
COPY perf ./perf
RUN pip install --no-cache-dir . \
 && cd / && rm -rf /src

# The proxy's uid (skipped by the init container's OUTPUT rules) and the control plane's.
RUN groupadd --gid 2102 micromesh-proxy \
 && useradd --uid 2102 --gid 2102 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin micromesh-proxy \
 && groupadd --gid 2103 micromesh \
 && useradd --uid 2103 --gid 2103 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin micromesh

WORKDIR /
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 2102
EXPOSE 4140 4143 4191
CMD ["python", "-m", "microproxy"]
