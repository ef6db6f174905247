#!/bin/sh
# Build the embedded engine (OPA's Go SDK as a C shared library) into $1.
# The one recipe, used by setup.py (pip install) and the Dockerfile: modules as
# native/go.sum pins them (read-only), paths trimmed, no build id or VCS stamp, so
# the same sources and Go give the same bytes.
set -eu
output=$1
cd "$(dirname "$0")"
CGO_ENABLED=1 GOFLAGS="-mod=readonly -buildvcs=false" \
    go build -buildmode=c-shared -trimpath -ldflags="-s -w -buildid=" -o "$output" .
rm -f "${output%.*}.h" # cgo's header: ctypes does not need it
