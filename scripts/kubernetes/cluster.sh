#!/usr/bin/env bash
# A single-node Kubernetes on loopback, for the tests (see README.md here).
#
#   bash scripts/kubernetes/cluster.sh up DIR [IMAGE ...]   # start; prints DIR/kubeconfig
#   bash scripts/kubernetes/cluster.sh import DIR IMAGE     # an image for its pods
#   (IMAGE: docker:NAME, a local Docker image, or a `docker save` archive)
#   bash scripts/kubernetes/cluster.sh down DIR                  # stop it all, unmount
#
# Everything lives in DIR (keep it short: containerd's sockets are there): etcd, the
# API server (127.0.0.1, certificates and a service-account key made here), the
# controller manager and the scheduler, a containerd of its own (own root, state and
# socket), a placeholder CNI configuration and the kubelet (node `localhost`). Pods use
# host networking and reach the API server and Prefect on 127.0.0.1; the service range
# is never connected to (the API server keeps no endpoints for it). Images come from
# local Docker images (`docker:NAME`) or `docker save` archives; nothing is pulled. The
# binaries come from build.sh. Logs: DIR/log/<part>.log; `up` prints the seconds each
# stage took.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
PAUSE_IMAGE=prefect-governance.local/pause:1
SERVICE_RANGE=10.254.0.0/24

die() { echo "cluster.sh: $*" >&2; exit 1; }
# containerd and its ctr are Debian's (apt-get install containerd), reached at our socket.
command -v containerd >/dev/null && command -v ctr >/dev/null ||
    die "containerd is not installed (apt-get install containerd)"

free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
held = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in held:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in held))
EOF
}

# Start a part in its own session; its pid goes to DIR/pid/<name>.
spawn() {
    local name=$1
    shift
    setsid "$@" >"$dir/log/$name.log" 2>&1 </dev/null &
    echo $! >"$dir/pid/$name"
}

alive() { [[ -f $dir/pid/$1 ]] && kill -0 "$(cat "$dir/pid/$1")" 2>/dev/null; }

# wait_for NAME SECONDS COMMAND...: until COMMAND succeeds, while NAME runs.
wait_for() {
    local name=$1 seconds=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        alive "$name" || die "$name exited; see $dir/log/$name.log: $(tail -5 "$dir/log/$name.log")"
        ((SECONDS < deadline)) || die "$name not ready in ${seconds}s; see $dir/log/$name.log"
        sleep 0.2
    done
}

certificates() {
    local pki=$dir/pki
    mkdir -p "$pki"
    (
        cd "$pki"
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=test-cluster-ca \
            -keyout ca.key -out ca.crt 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver \
            -keyout apiserver.key -out apiserver.csr 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >san.ext
        openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
            -extfile san.ext -out apiserver.crt 2>/dev/null
        # One client identity for the components and the tests: a cluster admin.
        openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=test-admin" \
            -keyout admin.key -out admin.csr 2>/dev/null
        printf 'extendedKeyUsage=clientAuth\n' >client.ext
        openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
            -extfile client.ext -out admin.crt 2>/dev/null
        openssl genrsa -out sa.key 2048 2>/dev/null
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    )
}

kubeconfig() {
    cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $dir/pki/ca.crt
users:
- name: admin
  user:
    client-certificate: $dir/pki/admin.crt
    client-key: $dir/pki/admin.key
contexts:
- name: local
  context: {cluster: local, user: admin, namespace: default}
current-context: local
EOF
}

containerd_config() {
    mkdir -p "$dir/cni/net.d" "$dir/cni/bin"
    # Pods use host networking: CRI only needs a network configuration to report the
    # network ready; no plugin of it is ever run.
    cat >"$dir/cni/net.d/10-placeholder.conflist" <<'EOF'
{"cniVersion": "0.4.0", "name": "placeholder", "plugins": [{"type": "loopback"}]}
EOF
    cat >"$dir/containerd.toml" <<EOF
version = 2
root = "$containerd_root"
state = "$dir/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$dir/containerd.sock"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # This VM lacks CAP_SYS_RESOURCE: never lower a container's OOM score below ours.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$dir/cni/bin"
    conf_dir = "$dir/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
EOF
}

kubelet_config() {
    cat >"$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$dir/containerd.sock
address: 127.0.0.1
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $kubelet_healthz
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $dir/pki/ca.crt}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
# cgroup v1 here, and no cgroup hierarchy of the kubelet's own.
failCgroupV1: false
cgroupsPerQOS: false
enforceNodeAllocatable: ["none"]
makeIPTablesUtilChains: false
failSwapOn: false
resolvConf: /etc/resolv.conf
serializeImagePulls: false
# Never collect the images the tests imported (nothing could pull them back).
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
registerNode: true
EOF
}

import_image() {
    ctr --address "$dir/containerd.sock" -n k8s.io images import --all-platforms - <"$1" \
        >/dev/null 2>>"$dir/log/import.log" ||
        die "could not import $1; see $dir/log/import.log"
}

# `docker:NAME`: a local Docker image, imported unless this containerd root holds that very
# image (same Docker image id) already; anything else: a `docker save` archive.
import_any() {
    [[ $1 == docker:* ]] || { import_image "$1"; return; }
    local name=${1#docker:} id seen
    id=$(docker image inspect -f '{{.Id}}' "$name") || die "no Docker image $name"
    seen=$(cat "$(cat "$dir/containerd-root")/imported/${name//[\/:]/_}" 2>/dev/null || true)
    [[ $seen == "$id" ]] && return 0
    docker save "$name" | import_image /dev/stdin
    mkdir -p "$(cat "$dir/containerd-root")/imported"
    echo "$id" >"$(cat "$dir/containerd-root")/imported/${name//[\/:]/_}"
}

# The sandbox image: our pause binary alone, as a `docker save` archive.
pause_image() {
    local work=$dir/pause-image
    rm -rf "$work"
    mkdir -p "$work/rootfs"
    install -m 0755 "$bin/pause" "$work/rootfs/pause"
    tar -C "$work/rootfs" --owner=0 --group=0 --numeric-owner --mtime=@0 -cf "$work/layer.tar" pause
    local digest
    digest=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
    cat >"$work/config.json" <<EOF
{"architecture": "amd64", "os": "linux",
 "config": {"Entrypoint": ["/pause"], "WorkingDir": "/"},
 "rootfs": {"type": "layers", "diff_ids": ["sha256:$digest"]}}
EOF
    cat >"$work/manifest.json" <<EOF
[{"Config": "config.json", "RepoTags": ["$PAUSE_IMAGE"], "Layers": ["layer.tar"]}]
EOF
    tar -C "$work" -cf "$work/pause.tar" manifest.json config.json layer.tar
    import_image "$work/pause.tar"
}

up() {
    [[ ! -e $dir/pid ]] || die "$dir holds a cluster already (cluster.sh down $dir first)"
    local t0=$SECONDS started
    bin=$(bash "$here/build.sh")
    cache=${bin%/bin}
    mkdir -p "$dir/log" "$dir/pid"
    mkdir -m 0700 -p "$dir/etcd"
    read -r etcd_port etcd_peer api_port kubelet_port kubelet_healthz < <(free_ports 5)
    certificates
    kubeconfig
    kubelet_config

    started=$SECONDS
    spawn etcd "$bin/etcd" --name local --data-dir "$dir/etcd" --unsafe-no-fsync \
        --listen-client-urls "http://127.0.0.1:$etcd_port" \
        --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "local=http://127.0.0.1:$etcd_peer"
    # containerd's root (its images) is kept in the cache between clusters, so an image is
    # unpacked once; a second cluster at the same time gets a root of its own in DIR.
    exec 8>"$cache/containerd.lock"
    if flock -n 8; then
        containerd_root=$cache/containerd
    else
        containerd_root=$dir/containerd/root
    fi
    echo "$containerd_root" >"$dir/containerd-root"
    containerd_config
    spawn containerd containerd --config "$dir/containerd.toml" # holds the lock (fd 8)
    exec 8>&-
    wait_for etcd 60 curl -sf "http://127.0.0.1:$etcd_port/health"
    spawn apiserver "$bin/kube-apiserver" \
        --etcd-servers "http://127.0.0.1:$etcd_port" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
        --tls-cert-file "$dir/pki/apiserver.crt" --tls-private-key-file "$dir/pki/apiserver.key" \
        --client-ca-file "$dir/pki/ca.crt" \
        --service-account-key-file "$dir/pki/sa.pub" \
        --service-account-signing-key-file "$dir/pki/sa.key" \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-cluster-ip-range "$SERVICE_RANGE" \
        --endpoint-reconciler-type none \
        --authorization-mode Node,RBAC \
        --allow-privileged=true \
        --kubelet-client-certificate "$dir/pki/admin.crt" \
        --kubelet-client-key "$dir/pki/admin.key" \
        --kubelet-preferred-address-types Hostname \
        --profiling=false
    wait_for apiserver 120 curl -sf --cacert "$dir/pki/ca.crt" --cert "$dir/pki/admin.crt" \
        --key "$dir/pki/admin.key" "https://127.0.0.1:$api_port/readyz"
    echo "control plane API ready in $((SECONDS - started)) s" >&2
    spawn controller-manager "$bin/kube-controller-manager" \
        --kubeconfig "$dir/kubeconfig" --leader-elect=false --secure-port 0 \
        --service-account-private-key-file "$dir/pki/sa.key" --root-ca-file "$dir/pki/ca.crt" \
        --use-service-account-credentials=false --profiling=false
    spawn scheduler "$bin/kube-scheduler" \
        --kubeconfig "$dir/kubeconfig" --leader-elect=false --secure-port 0 --profiling=false
    wait_for containerd 60 ctr --address "$dir/containerd.sock" version
    pause_image
    local image
    for image in "$@"; do import_any "$image"; done
    spawn kubelet "$bin/kubelet" --config "$dir/kubelet.yaml" --kubeconfig "$dir/kubeconfig" \
        --hostname-override localhost --root-dir "$dir/kubelet" --cert-dir "$dir/kubelet/pki" \
        --v 1
    wait_for kubelet 180 node_ready
    # Pods get a service account; its token controller must have made the default one.
    wait_for controller-manager 60 "$bin/kubectl" --kubeconfig "$dir/kubeconfig" \
        get serviceaccount default
    echo "node ready in $((SECONDS - started)) s ($((SECONDS - t0)) s with the build check)" >&2
    echo "$dir/kubeconfig"
}

node_ready() {
    [[ $("$bin/kubectl" --kubeconfig "$dir/kubeconfig" get node localhost \
        -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

stop_part() {
    local name=$1 pid
    [[ -f $dir/pid/$name ]] || return 0
    pid=$(cat "$dir/pid/$name")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/pid/$name"
}

# The processes whose command line names this cluster's directory (containerd's shims,
# the pods' processes under them are in their own sessions): by pid, one by one.
ours() {
    local p
    for p in /proc/[0-9]*; do
        [[ ${p#/proc/} == "$$" ]] && continue
        { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -qF -- "$dir/" && echo "${p#/proc/}"
    done
    return 0
}

down() {
    [[ -d $dir ]] || return 0
    bin=$(bash "$here/build.sh")
    stop_part kubelet
    if alive containerd; then # the pods' containers and sandboxes, then containerd
        local ctr=(ctr --address "$dir/containerd.sock" -n k8s.io) task
        for task in $("${ctr[@]}" tasks ls -q 2>/dev/null); do
            "${ctr[@]}" tasks kill -s SIGKILL "$task" >/dev/null 2>&1 || true
        done
        sleep 0.5
        for task in $("${ctr[@]}" tasks ls -q 2>/dev/null); do
            "${ctr[@]}" tasks delete --force "$task" >/dev/null 2>&1 || true
        done
        # The images stay (the root may be the cache's); the pods' containers go.
        local containers
        containers=$("${ctr[@]}" containers ls -q 2>/dev/null || true)
        # shellcheck disable=SC2086  # one argument per container
        [[ -z $containers ]] || "${ctr[@]}" containers delete $containers >/dev/null 2>&1 || true
    fi
    local part
    for part in scheduler controller-manager apiserver containerd etcd; do stop_part "$part"; done
    local pid
    for pid in $(ours); do kill -KILL "$pid" 2>/dev/null || true; done
    # Mounts under DIR (containers' root filesystems, shm, volumes), deepest first.
    awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r |
        while read -r target; do umount -l "$target" 2>/dev/null || true; done
    rmdir "$dir/pid" 2>/dev/null || true
}

command=${1:-}
[[ $# -ge 2 ]] || die "usage: cluster.sh up|import|down DIR [IMAGE.tar ...]"
mkdir -p "$2"
dir=$(cd "$2" && pwd)
shift 2
case $command in
up) up "$@" ;;
import)
    for image in "$@"; do import_any "$image"; done
    ;;
down) down ;;
*) die "unknown command $command" ;;
esac
