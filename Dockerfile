# pg-tenant-proxy gateway image (docs/deploy.md).
#   docker build -t pg-tenant-proxy:0.1.0 .
#   docker run -v $PWD/config.yaml:/etc/tenant-proxy/config.yaml:ro -e PROXY_DB_PASSWORD=... \
#     -p 8080:8080 -p 127.0.0.1:9090:9090 pg-tenant-proxy:0.1.0
# Two stages: the builder makes the gateway's wheel and a virtualenv from binary wheels
# only; the final image gets that virtualenv and nothing else (no pip, no compiler, no
# source tree).  Both stages use the same pinned base, so the venv's interpreter links hold.

FROM python:3.11.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest of the tree out).
COPY pyproject.toml README.md LICENSE ./
COPY proxy/ proxy/
# proxy/openapi.yaml links here: the wheel carries the OpenAPI document the gateway serves.
COPY docs/openapi.yaml docs/openapi.yaml

# The gateway's own wheel (pure Python; setuptools comes into an isolated build env).
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# The runtime venv, created without pip and filled by the builder's pip.  Dependencies come
# as binary wheels only (asyncpg, uvloop, orjson, pglast, psycopg-binary and cryptography
# all publish them): a missing wheel fails the build instead of compiling in secret.
# pip byte-compiles on install, so the read-only runtime never needs to write .pyc files.
RUN python -m venv --without-pip /opt/tenant-proxy \
 && pip --python /opt/tenant-proxy/bin/python install --no-cache-dir --only-binary=:all: /wheels/*.whl


FROM python:3.11.11-slim-bookworm

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="pg-tenant-proxy" \
      org.opencontainers.image.description="Tenant-isolating SQL-over-HTTP gateway for PostgreSQL behind PgBouncer" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="GPL-3.0-or-later" \
      org.opencontainers.image.documentation="docs/deploy.md"

ENV PATH=/opt/tenant-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without a passwd
# lookup and volume permissions can be granted to it.  No home, no shell.
RUN groupadd --system --gid 10001 tenantproxy \
 && useradd --system --uid 10001 --gid tenantproxy --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin tenantproxy \
 && mkdir -p /etc/tenant-proxy

COPY --from=builder /opt/tenant-proxy /opt/tenant-proxy
# The GPL asks that the licence travel with the binary.
COPY LICENSE /usr/share/doc/pg-tenant-proxy/LICENSE

USER 10001:10001

# 8080: data API (/v1/query, /v1/transaction).  9090: admin (health, /metrics, /admin/*):
# publish it only to the monitoring network.  The config must bind 0.0.0.0 to be reachable.
EXPOSE 8080 9090

# Liveness on the admin port: curl is not in the slim image, so Python's urllib does the
# request (it raises, and so exits non-zero, on anything but a 2xx).  Readiness (/readyz,
# a round trip through PgBouncer) is for load balancers and orchestrators, not a restart.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]

# The config is mounted here (a ConfigMap, a bind mount); secrets arrive as environment
# variables that the file names as ${VAR}.  SIGTERM drains in-flight requests
# (server.shutdown_timeout_s); SIGHUP reloads the config.
ENTRYPOINT ["tenant-proxy"]
CMD ["serve", "--config", "/etc/tenant-proxy/config.yaml"]
