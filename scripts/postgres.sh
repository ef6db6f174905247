#!/usr/bin/env bash
# Make sure PostgreSQL's server binaries (Debian's packages) are here for the tests.
# The tests start and stop their own throwaway cluster on a loopback port.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "PostgreSQL server is missing: run 'sudo apt-get install -y postgresql'" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq postgresql >/dev/null
