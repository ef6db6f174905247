#!/usr/bin/env bash
# Builds the test cluster's binaries (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kubectl, and the pods' pause) from Go modules, once, into a
# cache outside the clone keyed by the Kubernetes version; a later run finds them and
# returns at once (it builds only the binaries missing).
#
#   bash scripts/kubernetes/build.sh          # prints the bin directory
#   bash scripts/kubernetes/build.sh --tidy   # refreshes go.mod/go.sum here (maintainers)
#
# The main packages are k8s.io/kubernetes's own cmd/<x>/<x>.go, copied from the module
# cache at build time; etcd/main.go and pause/main.go are ours. KUBE_CACHE overrides
# the cache directory.
set -euo pipefail

K8S_VERSION=v1.37.2
here=$(cd "$(dirname "$0")" && pwd)
cache=${KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prefect-governance/kubernetes-$K8S_VERSION}
bin=$cache/bin
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl pause)
export PATH=/usr/local/go/bin:$PATH GOTOOLCHAIN=local CGO_ENABLED=0

missing() {
    local b
    for b in "${binaries[@]}"; do [[ -x $bin/$b ]] || echo "$b"; done
}
complete() { [[ -z $(missing) ]]; }

tidy=false
[[ ${1:-} == --tidy ]] && tidy=true
if ! $tidy && complete; then
    echo "$bin"
    exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9                               # one build at a time, across sessions
if ! $tidy && complete; then
    echo "$bin"
    exit 0
fi

src=$cache/src
rm -rf "$src" "$bin.partial"
mkdir -p "$src/cmd/etcd" "$src/cmd/pause"
cp "$here/go.mod" "$here/go.sum" "$src/" 2>/dev/null || cp "$here/go.mod" "$src/"
cp "$here/etcd/main.go" "$src/cmd/etcd/main.go"
cp "$here/pause/main.go" "$src/cmd/pause/main.go"
cd "$src"
go mod download k8s.io/kubernetes
k8s=$(go list -m -f '{{.Dir}}' k8s.io/kubernetes)
declare -A mains=(
    [kube-apiserver]=kube-apiserver/apiserver.go
    [kube-controller-manager]=kube-controller-manager/controller-manager.go
    [kube-scheduler]=kube-scheduler/scheduler.go
    [kubelet]=kubelet/kubelet.go
    [kubectl]=kubectl/kubectl.go
)
for name in "${!mains[@]}"; do
    mkdir -p "cmd/$name"
    install -m 0644 "$k8s/cmd/${mains[$name]}" "cmd/$name/main.go"
done
if $tidy; then
    go mod tidy
    cp go.mod go.sum "$here/"
fi
started=$SECONDS
build=$($tidy && printf '%s\n' "${binaries[@]}" || missing)
# shellcheck disable=SC2046  # one package per missing binary
go build -trimpath -ldflags "-s -w" -o "$bin.partial/" $(printf './cmd/%s ' $build)
mkdir -p "$bin"
for b in $build; do mv "$bin.partial/$b" "$bin/$b"; done
rm -rf "$bin.partial"
echo "built" $build "in $((SECONDS - started)) s" >&2
echo "$bin"
