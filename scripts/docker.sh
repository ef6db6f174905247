#!/usr/bin/env bash
# A Docker engine and locally made images for the tests (no image registry is reachable here).
#
#   bash scripts/docker.sh [daemon] [base] [image] [status] [stop]   (default: daemon base)
#
# daemon  reuse the engine answering on $DOCKER_SOCK (one for the whole machine), or start
#         Debian's `dockerd --bridge=none --iptables=false` (no network of its own; containers
#         use host networking), logging to $CACHE/dockerd.log, and wait until it answers.
# base    $BASE_IMAGE (prefect-governance-base:bookworm): `debootstrap --variant=minbase` of
#         bookworm with python3, python3-venv and ca-certificates, then a venv at /usr/local
#         so `python`/`pip` sit where the upstream slim image has them; `docker import`ed.
#         The rootfs tarball is cached in $CACHE keyed by its recipe (a fresh clone with a
#         warm cache does not debootstrap again); the image is tagged with the key too.
# image   the project's image $PROJECT_IMAGE from the Dockerfile on that base, without the
#         Go stage: a wheelhouse built on the host (the project's wheel with the engine the
#         venv built, every pin of deploy/constraints.txt) installed with `pip --no-index`.
# stop    stop the engine, only if this script started it (its pid file in $CACHE).
#
# Idempotent and safe to run concurrently (one lock). Timings go to stderr.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${PREFECT_GOVERNANCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prefect-governance}"
DOCKER_SOCK="${DOCKER_SOCK:-/var/run/docker.sock}"
BASE_IMAGE="${BASE_IMAGE:-prefect-governance-base:bookworm}"
PROJECT_IMAGE="${PROJECT_IMAGE:-prefect-governance}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
# The Debian client matches the Debian engine (20.10) and has BuildKit built in; another
# `docker` on PATH (a 28.x client without buildx) is used only when it is missing.
DOCKER="${DOCKER:-$(command -v /usr/bin/docker || command -v docker || echo docker)}"
export DOCKER_HOST="${DOCKER_HOST:-unix://$DOCKER_SOCK}"

mkdir -p "$CACHE"
log() { printf 'docker.sh: %s\n' "$*" >&2; }
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

ROOTFS_TMP=""
trap '[ -z "$ROOTFS_TMP" ] || rm -rf "$ROOTFS_TMP"' EXIT
exec 9>"$CACHE/docker.lock"
flock 9

answers() { timeout 10 "$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1; }

daemon() {
  if answers; then
    log "engine $("$DOCKER" version --format '{{.Server.Version}}') answers on $DOCKER_HOST"
    return 0
  fi
  if [ "$DOCKER_HOST" != "unix://$DOCKER_SOCK" ]; then
    log "DOCKER_HOST=$DOCKER_HOST does not answer (not starting an engine for it)"
    return 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    log "no Docker engine answers on $DOCKER_SOCK; start one as root: sudo bash $0 daemon"
    return 1
  fi
  local dockerd
  dockerd="$(command -v dockerd || echo /usr/sbin/dockerd)"
  [ -x "$dockerd" ] || { log "dockerd is missing: apt-get install -y docker.io"; return 1; }
  local started
  started="$(now)"
  # setsid: the engine outlives this script and the test run that started it.
  setsid "$dockerd" --bridge=none --iptables=false --ip6tables=false \
    --host "unix://$DOCKER_SOCK" --pidfile "$CACHE/dockerd.pid" \
    >>"$CACHE/dockerd.log" 2>&1 </dev/null 9>&- &
  local i
  for i in $(seq 1 120); do
    if answers; then
      log "started dockerd (pid $(cat "$CACHE/dockerd.pid"), log $CACHE/dockerd.log) in $(took "$started") s"
      return 0
    fi
    if ! kill -0 $! 2>/dev/null; then
      log "dockerd exited; its log ($CACHE/dockerd.log):"
      tail -n 20 "$CACHE/dockerd.log" >&2
      return 1
    fi
    sleep 0.5
  done
  log "dockerd did not answer within 60 s; see $CACHE/dockerd.log"
  return 1
}

# Everything that decides what the base image holds. Change it and the key changes.
base_recipe() {
  cat <<EOF
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm $DEBIAN_MIRROR
chroot: python3 -m venv /usr/local; rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
import: ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8; CMD ["python3"]
EOF
}

base() {
  local key tarball tmp started
  key="$(base_recipe | sha256sum | cut -c1-16)"
  tarball="$CACHE/base-bookworm-$key.tar"
  if "$DOCKER" image inspect "$BASE_IMAGE-$key" >/dev/null 2>&1; then
    "$DOCKER" tag "$BASE_IMAGE-$key" "$BASE_IMAGE"
    log "base image $BASE_IMAGE is up to date (recipe $key)"
    return 0
  fi
  started="$(now)"
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || { log "debootstrap is missing: apt-get install -y debootstrap"; return 1; }
    [ "$(id -u)" -eq 0 ] || { log "debootstrap needs root: sudo bash $0 base"; return 1; }
    tmp="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
    ROOTFS_TMP="$tmp"
    log "debootstrap bookworm into $tmp (a few minutes; cached afterwards as $tarball)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$tmp" "$DEBIAN_MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -n 20 "$CACHE/debootstrap.log" >&2; return 1; }
    chroot "$tmp" /usr/bin/python3 -m venv /usr/local
    rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/var/cache/apt/archives/*.deb
    tar -C "$tmp" --numeric-owner -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
    rm -rf "$tmp"
    ROOTFS_TMP=""
    log "rootfs made in $(took "$started") s ($(du -h "$tarball" | cut -f1))"
  fi
  "$DOCKER" import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$tarball" "$BASE_IMAGE-$key" >/dev/null
  "$DOCKER" tag "$BASE_IMAGE-$key" "$BASE_IMAGE"
  log "base image $BASE_IMAGE (recipe $key) ready in $(took "$started") s"
}

# The Dockerfile's ENGINE=wheelhouse input: build/wheelhouse/ with the project's wheel (built
# on the host with the engine the venv built, PREFECT_GOVERNANCE_PREBUILT_ENGINE) and a wheel
# of every pin in deploy/constraints.txt. The dependencies are resolved by the base image's own
# pip (its Python decides the markers: bookworm's 3.11.2 needs async-timeout, 3.11.14 does not),
# reaching the index as this machine's pip does (its certificate bundle), and cached in $CACHE
# by the constraints and the base recipe.
wheelhouse() {
  local engine key deps wheels started cert
  engine="$ROOT/prefect_governance/core/engines/libgovrego.so"
  [ -x "$PYTHON" ] || { log "no venv at $ROOT/.venv: make install"; return 1; }
  [ -s "$engine" ] || { log "the embedded engine is not built ($engine): make install"; return 1; }
  key="$( (cat "$ROOT/deploy/constraints.txt"; base_recipe) | sha256sum | cut -c1-16)"
  deps="$CACHE/wheels-$key"
  wheels="$ROOT/build/wheelhouse"
  started="$(now)"
  if [ ! -f "$deps/.complete" ]; then
    rm -rf "$deps"
    mkdir -p "$deps"
    cert="${PIP_CERT:-$("$PYTHON" -m pip config get global.cert 2>/dev/null || true)}"
    cert="${cert:-/etc/ssl/certs/ca-certificates.crt}"
    "$DOCKER" run --rm --network host \
      -v "$deps:/wheels" -v "$ROOT/deploy/constraints.txt:/constraints.txt:ro" \
      -v "$cert:/etc/pip-ca.crt:ro" -e PIP_CERT=/etc/pip-ca.crt \
      -e PIP_DEFAULT_TIMEOUT=180 -e PIP_DISABLE_PIP_VERSION_CHECK=1 \
      ${PIP_INDEX_URL:+-e PIP_INDEX_URL="$PIP_INDEX_URL"} \
      "$BASE_IMAGE" pip wheel --quiet --wheel-dir /wheels \
      --constraint /constraints.txt --requirement /constraints.txt
    touch "$deps/.complete"
    log "dependency wheels made in $(took "$started") s ($deps)"
  fi
  rm -rf "$wheels"
  mkdir -p "$wheels/deps" "$wheels/project"
  cp -l "$deps"/*.whl "$wheels/deps"/ 2>/dev/null || cp "$deps"/*.whl "$wheels/deps"/
  # A fixed timestamp: the same code gives the same wheel, and the image build its cache.
  SOURCE_DATE_EPOCH=315532800 PREFECT_GOVERNANCE_PREBUILT_ENGINE="$engine" \
    "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$wheels/project" "$ROOT"
  log "wheelhouse $wheels ready in $(took "$started") s"
}

project_version() {
  sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/prefect_governance/__init__.py"
}

# The project's image: the Dockerfile on the local base, from the wheelhouse (no Go stage, no
# network inside the build; --network host so nothing needs a bridge).
image() {
  local version started
  version="$(project_version)"
  [ -n "$version" ] || { log "no __version__ in prefect_governance/__init__.py"; return 1; }
  started="$(now)"
  wheelhouse
  DOCKER_BUILDKIT=1 "$DOCKER" build --quiet --network host \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg ENGINE=wheelhouse \
    --tag "$PROJECT_IMAGE:$version" --tag "$PROJECT_IMAGE:test" "$ROOT" >/dev/null
  log "image $PROJECT_IMAGE:$version (and :test) built in $(took "$started") s"
}

status() {
  answers || { log "no engine answers on $DOCKER_HOST"; return 1; }
  "$DOCKER" version --format 'engine {{.Server.Version}} (API {{.Server.APIVersion}})'
  "$DOCKER" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^prefect-governance' || true
}

stop() {
  local pid
  pid="$(cat "$CACHE/dockerd.pid" 2>/dev/null || true)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    log "stopped dockerd (pid $pid)"
  else
    log "no engine started by this script is running"
  fi
}

[ "$#" -gt 0 ] || set -- base
for step in "$@"; do
  case "$step" in
    daemon) daemon ;;
    base) daemon && base ;;
    image) daemon && base && image ;;
    status) status ;;
    stop) stop ;;
    *) log "unknown step: $step (daemon, base, image, status, stop)"; exit 2 ;;
  esac
done
