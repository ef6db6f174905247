# The governed worker: `prefect worker start --type governed-process`, as an unprivileged user.
#
#   docker build -t prefect-governance:0.1.0 .
#   docker run -e PREFECT_API_URL=http://prefect:4200/api -e PREFECT_WORK_POOL=governed \
#       prefect-governance:0.1.0 [--limit 4 ...]      # extra `prefect worker start` options
#
# Decisions come from the embedded Rego engine and the packaged policies, or from an OPA
# sidecar when PREFECT_GOVERNANCE_OPA_URL is set. OPA is not in this image (it runs beside it:
# docker-compose.yml, deploy/kubernetes/). Every version installed is pinned in
# deploy/constraints.txt, which tests/test_container.py checks against pyproject.toml.
# The base image is pinned by tag and digest; see deploy/README.md. Both build arguments
# keep the upstream build as it was when left at their defaults:
#
#   BASE_IMAGE  the image to build on (a python:3.11-slim layout: `python` and `pip` on PATH);
#               scripts/docker.sh passes a locally made Debian bookworm base.
#   ENGINE      where the package comes from:
#               go          (default) the embedded policy engine (OPA's Go SDK as a C library,
#                           native/build.sh) built in a Go stage, then `pip install .` from
#                           the index, so the worker image needs no Go;
#               wheelhouse  no Go stage and no network: build/wheelhouse/ holds the project's
#                           wheel and every pinned dependency (`scripts/docker.sh image` makes
#                           it with `pip wheel` on the host), installed with `--no-index`.
# Only the stage ENGINE names is built: BuildKit (the default builder since Docker 23; on
# Docker 20.10 set DOCKER_BUILDKIT=1).
ARG BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
ARG ENGINE=go

# The Go image is pinned by its patch tag (its digest could not be resolved where this file
# was written; pin it where you build).
FROM golang:1.26.8-bookworm AS engine-go
WORKDIR /src/native
COPY native/ ./
RUN sh build.sh /out/engine/libgovrego.so && mkdir -p /out/deps

FROM scratch AS engine-wheelhouse
COPY build/wheelhouse/deps/ /out/deps/
COPY build/wheelhouse/project/ /out/engine/

# hadolint ignore=DL3006
FROM engine-${ENGINE} AS engine

# hadolint ignore=DL3006
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/prefect-governance
COPY deploy/constraints.txt ./deploy/constraints.txt
# From a wheelhouse the pinned dependencies come first, a layer that a code change keeps.
COPY --from=engine /out/deps/ /tmp/deps/
RUN if [ -n "$(ls /tmp/deps)" ]; then \
        pip install --no-index --find-links /tmp/deps --requirement deploy/constraints.txt; \
    fi \
    && rm -rf /tmp/deps
COPY pyproject.toml README.md ./
COPY prefect_governance ./prefect_governance
COPY policies ./policies
COPY setup.py MANIFEST.in ./
COPY native ./native
COPY --from=engine /out/engine/ /tmp/engine/
RUN if [ -e /tmp/engine/libgovrego.so ]; then \
        PREFECT_GOVERNANCE_PREBUILT_ENGINE=/tmp/engine/libgovrego.so \
        pip install --constraint deploy/constraints.txt '.[postgres]'; \
    else \
        pip install --no-index --find-links /tmp/engine \
            --constraint deploy/constraints.txt 'prefect-governance[postgres]'; \
    fi \
    && rm -rf /tmp/engine \
    && groupadd --gid 10001 prefect \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin prefect

# Block documents and example flows, for `prefect-governance apply blocks/` and the demo.
COPY blocks ./blocks
COPY examples ./examples

USER 10001:10001
ENV PREFECT_HOME=/home/prefect/.prefect \
    PREFECT_WORK_POOL=governed \
    PREFECT_WORKER_WEBSERVER_HOST=0.0.0.0 \
    PREFECT_WORKER_WEBSERVER_PORT=8080
EXPOSE 8080

# `--with-healthcheck` serves GET /health on PREFECT_WORKER_WEBSERVER_PORT: 200 while the
# worker polls its pool, 503 when it has stopped polling.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ['PREFECT_WORKER_WEBSERVER_PORT'], timeout=4)"]

# The pool comes from PREFECT_WORK_POOL; arguments given to `docker run` are appended.
ENTRYPOINT ["/bin/sh", "-c", "exec prefect worker start --type governed-process --pool \"$PREFECT_WORK_POOL\" --with-healthcheck \"$@\"", "prefect-worker"]
CMD []
