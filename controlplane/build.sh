#!/usr/bin/env bash
# Builds the real control-plane binaries (kube-apiserver, kube-scheduler, kube-controller-manager,
# etcd, kwok), the real node's kubelet and pause process, the gRPC tools (ghz, grpcurl), helm and
# the Go code generators (protoc-gen-go, protoc-gen-go-grpc) from the Go module proxy, into a cache
# outside the checkout keyed by version.
#
# Why a script and not `go install`: k8s.io/kubernetes and etcd's server module carry replace
# directives, which `go install pkg@version` refuses. We generate a throw-away wrapper module per
# release whose replace lines come from that release's own go.mod, so nothing is copied by hand.
#
# Usage: controlplane/build.sh [--quiet]    prints the bin directory on the last line.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

CACHE=${SHEPHERD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shepherd}
BIN="$CACHE/bin"
SRC="$CACHE/src"
LOGS="$CACHE/build-logs"
mkdir -p "$BIN" "$SRC" "$LOGS"

die() { echo "controlplane/build: $*" >&2; exit 1; }
step() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

command -v go >/dev/null || die "Go is not on PATH. Install Go >= 1.24 (this machine kind ships it) and retry."
gover=$(go env GOVERSION | sed 's/^go//')
case "$gover" in 1.2[4-9]*|1.[3-9]*) ;; *) die "Go $gover is too old: need >= 1.24 for 'go get -tool'." ;; esac

export GOFLAGS="${GOFLAGS:-} -buildvcs=false"
export CGO_ENABLED=0
# Two cores: let the compiler use both, no more.
JOBS=${SHEPHERD_BUILD_JOBS:-$(nproc)}

# run_logged NAME CMD...: run a build step, keep its log, and on failure say where the log is.
run_logged() {
  local name=$1; shift
  local log="$LOGS/$name.log"
  if ! "$@" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "step '$name' failed; full log: $log"
  fi
}

# Keep a heartbeat on stderr during long compiles so the first build visibly progresses.
with_progress() {
  local label=$1; shift
  local start=$SECONDS
  "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 15
    kill -0 "$pid" 2>/dev/null && step "$label: still building ($((SECONDS - start))s)"
  done
  wait "$pid"
}

# Everything built from the Kubernetes wrapper module. A binary already in the cache is never
# rebuilt or replaced, so adding a tool here leaves the binaries running clusters use untouched.
K8S_TOOLS=(kube-apiserver kube-scheduler kube-controller-manager kubelet)

# prepare_k8s_wrapper DIR: the throw-away wrapper module, made once per release (a marker says it is
# complete); its replace lines come from the release's own go.mod.
prepare_k8s_wrapper() {
  local w=$1
  if [[ "$(cat "$w/.prepared" 2>/dev/null)" == "${K8S_TOOLS[*]}" ]]; then return; fi
  step "kubernetes v$K8S_VERSION: preparing wrapper module (first build only, ~10-20 min on 2 cores)"
  rm -rf "$w"; mkdir -p "$w"; cd "$w"
  go mod init local.shepherd/k8sbin >/dev/null 2>&1
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" \
          | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])') \
    || die "cannot fetch k8s.io/kubernetes@v$K8S_VERSION from the Go module proxy ($(go env GOPROXY))"
  local minor_patch=${K8S_VERSION#1.}
  # Every staging module that the release replaces with ./staging/... is published as v0.<minor>.<patch>.
  local mods
  mods=$(sed -n 's|^[[:space:]]*\(k8s\.io/[^ ]*\) => \./staging/src/.*|\1|p' "$gomod")
  [[ -n "$mods" ]] || die "found no staging replace lines in $gomod"
  for m in $mods; do go mod edit -replace="$m=$m@v0.$minor_patch"; done
  local gd; gd=$(sed -n 's/^godebug default=\(.*\)$/\1/p' "$gomod")
  [[ -n "$gd" ]] && go mod edit -godebug="default=$gd"
  step "kubernetes v$K8S_VERSION: resolving modules"
  local tools=()
  for t in "${K8S_TOOLS[@]}"; do tools+=("k8s.io/kubernetes/cmd/$t@v$K8S_VERSION"); done
  run_logged k8s-get go get -tool "${tools[@]}"
  echo "${K8S_TOOLS[*]}" > .prepared
}

build_kubernetes() {
  local out="$BIN/kubernetes-v$K8S_VERSION"
  local missing=() t
  for t in "${K8S_TOOLS[@]}"; do [[ -x "$out/$t" ]] || missing+=("$t"); done
  if (( ${#missing[@]} == 0 )); then return; fi
  local w="$SRC/kubernetes-v$K8S_VERSION"
  prepare_k8s_wrapper "$w"
  cd "$w"
  local minor_patch=${K8S_VERSION#1.}
  local minor=${minor_patch%%.*}
  local ld="-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION \
    -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
    -X k8s.io/client-go/pkg/version.gitVersion=v$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 \
    -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  local pkgs=()
  for t in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$t"); done
  step "kubernetes v$K8S_VERSION: compiling ${missing[*]}"
  rm -rf "$out.tmp"; mkdir -p "$out.tmp" "$out"
  with_progress "${missing[*]}" run_logged k8s-build \
    go build -p "$JOBS" -trimpath -ldflags "$ld" -o "$out.tmp/" "${pkgs[@]}"
  # One rename per binary: what is already in $out (and maybe running) stays as it is.
  for t in "${missing[@]}"; do mv "$out.tmp/$t" "$out/$t"; done
  rm -rf "$out.tmp"
}

# The real node's sandbox ("pause") process: controlplane/pause.go, built static,
# cached by the hash of its source.
build_pause() {
  local src="$here/pause.go"
  local key; key=$(sha256sum "$src" | cut -c1-12)
  local out="$BIN/pause-$key"
  PAUSE_DIR=$out
  if [[ -x "$out/pause" ]]; then return; fi
  step "pause ($key): building"
  rm -rf "$out.tmp"; mkdir -p "$out.tmp"
  (cd "$out.tmp" && run_logged pause-build go build -trimpath -ldflags "-s -w" -o pause "$src")
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_etcd() {
  local out="$BIN/etcd-v$ETCD_VERSION"
  if [[ -x "$out/etcd" ]]; then return; fi
  step "etcd v$ETCD_VERSION: building (own wrapper module, so Kubernetes' versions do not leak in)"
  local w="$SRC/etcd-v$ETCD_VERSION"
  rm -rf "$w"; mkdir -p "$w"; cd "$w"
  go mod init local.shepherd/etcdbin >/dev/null 2>&1
  run_logged etcd-get go get -tool "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" "go.etcd.io/etcd/etcdctl/v3@v$ETCD_VERSION"
  mkdir -p "$out.tmp"
  with_progress etcd run_logged etcd-build go build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3
  run_logged etcdctl-build go build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$out.tmp/etcdctl" go.etcd.io/etcd/etcdctl/v3
  rm -rf "$out"; mv "$out.tmp" "$out"
}

# go_install NAME VERSION PKG BINARY: plain `go install` for tools without replace directives.
go_install() {
  local name=$1 version=$2 pkg=$3 binary=$4
  local out="$BIN/$name-$version"
  if [[ -x "$out/$binary" ]]; then return; fi
  step "$name $version: go install"
  mkdir -p "$out.tmp"
  with_progress "$name" run_logged "$name-install" env GOBIN="$out.tmp" go install -trimpath -ldflags "-s -w" "$pkg@$version"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

# Two builds at once (a test starting a spare cluster while `make binaries` runs) would share the
# wrapper module directory; take turns.
exec 9>"$CACHE/build.lock"
flock 9

start=$SECONDS
build_etcd
go_install kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok kwok
go_install ghz "$GHZ_VERSION" github.com/bojand/ghz/cmd/ghz ghz
go_install grpcurl "$GRPCURL_VERSION" github.com/fullstorydev/grpcurl/cmd/grpcurl grpcurl
go_install helm "$HELM_VERSION" helm.sh/helm/v4/cmd/helm helm
go_install protoc-gen-go "$PROTOC_GEN_GO_VERSION" google.golang.org/protobuf/cmd/protoc-gen-go protoc-gen-go
go_install protoc-gen-go-grpc "$PROTOC_GEN_GO_GRPC_VERSION" google.golang.org/grpc/cmd/protoc-gen-go-grpc protoc-gen-go-grpc
build_kubernetes
build_pause

# A stable directory of symlinks, so callers need not know the version layout.
cur="$BIN/current"
mkdir -p "$cur"
ln -sf "$BIN/kubernetes-v$K8S_VERSION/kube-apiserver" "$cur/kube-apiserver"
ln -sf "$BIN/kubernetes-v$K8S_VERSION/kube-scheduler" "$cur/kube-scheduler"
ln -sf "$BIN/kubernetes-v$K8S_VERSION/kube-controller-manager" "$cur/kube-controller-manager"
ln -sf "$BIN/kubernetes-v$K8S_VERSION/kubelet" "$cur/kubelet"
ln -sf "$PAUSE_DIR/pause" "$cur/pause"
ln -sf "$BIN/etcd-v$ETCD_VERSION/etcd" "$cur/etcd"
ln -sf "$BIN/etcd-v$ETCD_VERSION/etcdctl" "$cur/etcdctl"
ln -sf "$BIN/kwok-$KWOK_VERSION/kwok" "$cur/kwok"
ln -sf "$BIN/ghz-$GHZ_VERSION/ghz" "$cur/ghz"
ln -sf "$BIN/grpcurl-$GRPCURL_VERSION/grpcurl" "$cur/grpcurl"
ln -sf "$BIN/helm-$HELM_VERSION/helm" "$cur/helm"
ln -sf "$BIN/protoc-gen-go-$PROTOC_GEN_GO_VERSION/protoc-gen-go" "$cur/protoc-gen-go"
ln -sf "$BIN/protoc-gen-go-grpc-$PROTOC_GEN_GO_GRPC_VERSION/protoc-gen-go-grpc" "$cur/protoc-gen-go-grpc"
step "binaries ready in $cur ($((SECONDS - start))s)"
echo "$cur"
