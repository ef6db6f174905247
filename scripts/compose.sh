#!/usr/bin/env bash
# Compose v2 and local stand-ins for the registry images docker-compose.yml names (no image
# registry is reachable here), for the tests.
#
#   bash scripts/compose.sh [compose] [opa] [postgres] [images]   (default: compose images)
#
# compose   Compose v2 from its Go module (github.com/docker/compose/v2/cmd@$COMPOSE_VERSION),
#           built once into $CACHE/compose-$COMPOSE_VERSION and installed as the CLI plugin
#           ~/.docker/cli-plugins/docker-compose.
# opa       $OPA_IMAGE (openpolicyagent/opa:1.22.2-static, the name docker-compose.yml uses):
#           a static OPA (CGO_ENABLED=0 go install of its module, cached in
#           $CACHE/opa-static-$OPA_VERSION) as /opa in a `FROM scratch` image, like upstream's.
# postgres  $POSTGRES_IMAGE (prefect-governance-postgres:15-bookworm; the compose file pins
#           the official image by digest, which no local image can carry, so the test
#           override names this one): Debian's PostgreSQL 15 on the local base image
#           (scripts/docker.sh base), with an entrypoint honouring what the compose file and
#           deploy/compose/postgres-init.sh use of the official image: POSTGRES_USER,
#           POSTGRES_PASSWORD, POSTGRES_DB, /docker-entrypoint-initdb.d/*.sh on first start,
#           data in /var/lib/postgresql/data, pg_isready on PATH.
# images    opa and postgres (each needs the engine: scripts/docker.sh daemon base).
#
# Idempotent (images are tagged with a key of their recipe and rebuilt only when it changes).
# Timings go to stderr.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${PREFECT_GOVERNANCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prefect-governance}"
COMPOSE_VERSION="${COMPOSE_VERSION:-v2.29.7}"
OPA_VERSION="${OPA_VERSION:-v1.22.2}"
OPA_IMAGE="${OPA_IMAGE:-openpolicyagent/opa:1.22.2-static}"
POSTGRES_IMAGE="${POSTGRES_IMAGE:-prefect-governance-postgres:15-bookworm}"
BASE_IMAGE="${BASE_IMAGE:-prefect-governance-base:bookworm}"
PLUGINS="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
DOCKER="${DOCKER:-$(command -v /usr/bin/docker || command -v docker || echo docker)}"
export DOCKER_HOST="${DOCKER_HOST:-unix:///var/run/docker.sock}"
export PATH="/usr/local/go/bin:$PATH" GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

mkdir -p "$CACHE"
log() { printf 'compose.sh: %s\n' "$*" >&2; }
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

BUILD_DIR=""
trap '[ -z "$BUILD_DIR" ] || rm -rf "$BUILD_DIR"' EXIT
exec 9>"$CACHE/compose.lock"
flock 9

compose() {
  local bin="$CACHE/compose-$COMPOSE_VERSION/docker-compose" started
  if [ ! -x "$bin" ]; then
    started="$(now)"
    log "building Compose $COMPOSE_VERSION from its Go module (a few minutes, once)"
    mkdir -p "$CACHE/compose-$COMPOSE_VERSION"
    CGO_ENABLED=0 GOBIN="$CACHE/compose-$COMPOSE_VERSION" go install -trimpath \
      -ldflags "-s -w -X github.com/docker/compose/v2/internal.Version=$COMPOSE_VERSION" \
      "github.com/docker/compose/v2/cmd@$COMPOSE_VERSION"
    mv "$CACHE/compose-$COMPOSE_VERSION/cmd" "$bin"
    log "Compose built in $(took "$started") s"
  fi
  mkdir -p "$PLUGINS"
  if ! cmp -s "$bin" "$PLUGINS/docker-compose"; then
    install -m 0755 "$bin" "$PLUGINS/docker-compose"
  fi
  log "$("$DOCKER" compose version)"
}

# Build $1 (a directory with a Dockerfile) as $2 on network $3, unless an image of that name
# was built from the same files on the same base (the recipe key, in a label).
build_keyed() {
  local dir="$1" image="$2" network="$3" key started
  key="$( (cd "$dir" && find . -type f -print0 | sort -z | xargs -0 sha256sum
    "$DOCKER" image inspect --format '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || true) \
    | sha256sum | cut -c1-16)"
  if [ "$("$DOCKER" image inspect --format '{{index .Config.Labels "prefect-governance.recipe"}}' "$image" 2>/dev/null)" = "$key" ]; then
    log "$image is up to date (recipe $key)"
    return 0
  fi
  started="$(now)"
  DOCKER_BUILDKIT=1 "$DOCKER" build --quiet --network "$network" \
    --label "prefect-governance.recipe=$key" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    -t "$image" "$dir" >/dev/null
  log "$image (recipe $key) built in $(took "$started") s"
}

opa() {
  local gobin="$CACHE/opa-static-$OPA_VERSION" started
  if [ ! -x "$gobin/opa" ]; then
    started="$(now)"
    log "building a static OPA $OPA_VERSION from its Go module (a few minutes, once)"
    mkdir -p "$gobin"
    CGO_ENABLED=0 GOBIN="$gobin" go install -trimpath -ldflags "-s -w" \
      "github.com/open-policy-agent/opa@$OPA_VERSION"
    log "static OPA built in $(took "$started") s"
  fi
  if ldd "$gobin/opa" >/dev/null 2>&1; then
    log "$gobin/opa is dynamically linked; a scratch image needs a static binary"
    return 1
  fi
  BUILD_DIR="$(mktemp -d)"
  cp "$gobin/opa" "$BUILD_DIR/opa"
  cat >"$BUILD_DIR/Dockerfile" <<'EOF'
# Stand-in for openpolicyagent/opa:<version>-static: the static binary alone, as /opa.
FROM scratch
COPY opa /opa
USER 1000:1000
ENTRYPOINT ["/opa"]
CMD ["run"]
EOF
  build_keyed "$BUILD_DIR" "$OPA_IMAGE" none
  rm -rf "$BUILD_DIR"
  BUILD_DIR=""
}

postgres() {
  "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
    || { log "the base image $BASE_IMAGE is missing: bash scripts/docker.sh base"; return 1; }
  # apt reaches Debian's mirror (a package registry) from the build: host network.
  build_keyed "$ROOT/deploy/compose/postgres-standin" "$POSTGRES_IMAGE" host
}

[ "$#" -gt 0 ] || set -- compose images
for step in "$@"; do
  case "$step" in
    compose) compose ;;
    opa) opa ;;
    postgres) postgres ;;
    images) opa && postgres ;;
    *) log "unknown step: $step (compose, opa, postgres, images)"; exit 2 ;;
  esac
done
