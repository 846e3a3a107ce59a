#!/usr/bin/env bash
# Builds the real test peers from Go modules, pinned, cached by version under ~/.cache.
# Usage: tests/peers/build.sh [k8s|helm|mocknvml|cdi|all] ...   (default: all)
# Env:   K8S_VERSION (default from pins.env), GPU_DRA_PEERS_CACHE (default ~/.cache/gpu-dra/peers)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=pins.env
source "$here/pins.env"
K8S_VERSION=${K8S_VERSION:-$K8S_PRIMARY}
cache=${GPU_DRA_PEERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gpu-dra/peers}
mkdir -p "$cache"
export GOFLAGS="${GOFLAGS:-} -buildvcs=false -mod=mod"
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}

say() { printf '[peers %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# done_stamp DIR KEY: true when DIR was built for exactly KEY (a pin change rebuilds).
done_stamp() { [[ -f "$1/.built" && "$(cat "$1/.built")" == "$2" ]]; }

build_k8s() {
  local ver=$1
  local dir="$cache/k8s-$ver" key="k8s=$ver etcd-main=1 script=2"
  if done_stamp "$dir" "$key"; then say "kubernetes $ver: cached in $dir/bin"; return; fi
  say "kubernetes $ver: building etcd, kube-apiserver, kube-scheduler, kube-controller-manager (first time: 15-30 min on 2 cores)"
  rm -rf "$dir/src" && mkdir -p "$dir/src/cmd/etcd" "$dir/bin"
  local minor=${ver#v1.}
  local staging_ver="v0.${minor}"
  # k8s.io/kubernetes names its staging modules at v0.0.0 with local replaces; point them at the
  # published tags of the same release instead.
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$ver" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  local gover
  gover=$(awk '$1=="go"{print $2; exit}' "$gomod")
  {
    echo "module gpudra.local/peers/k8s"
    echo
    echo "go $gover"
    echo
    echo "require k8s.io/kubernetes $ver"
    echo
    grep -E '^\s+k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" \
      | awk -v v="$staging_ver" '{print "replace " $1 " => " $1 " " v}'
  } >"$dir/src/go.mod"
  cat >"$dir/src/cmd/etcd/main.go" <<'GO'
// Command etcd is etcd's server entry point, built at the version Kubernetes pins.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (
    cd "$dir/src"
    say "kubernetes $ver: resolving modules"
    go get "k8s.io/kubernetes@$ver" "go.etcd.io/etcd/server/v3" >/dev/null 2>&1 || true
    for cmd in kube-apiserver kube-scheduler kube-controller-manager; do
      say "kubernetes $ver: go build $cmd"
      go build -ldflags='-s -w' -o "$dir/bin/$cmd" "k8s.io/kubernetes/cmd/$cmd"
    done
    say "kubernetes $ver: go build etcd"
    go build -ldflags='-s -w' -o "$dir/bin/etcd" ./cmd/etcd
  )
  echo "$key" >"$dir/.built"
  say "kubernetes $ver: done -> $dir/bin"
}

build_helm() {
  local dir="$cache/helm-$HELM_VERSION" key="helm=$HELM_VERSION script=1"
  if done_stamp "$dir" "$key"; then say "helm $HELM_VERSION: cached"; return; fi
  say "helm $HELM_VERSION: building (first time: ~5 min)"
  rm -rf "$dir/src" && mkdir -p "$dir/src" "$dir/bin"
  local mod=${HELM_MODULE}
  printf 'module gpudra.local/peers/helm\n\ngo 1.24\n\nrequire %s %s\n' "$mod" "$HELM_VERSION" >"$dir/src/go.mod"
  (
    cd "$dir/src"
    go get "$mod@$HELM_VERSION" >/dev/null 2>&1 || true
    go build -ldflags="-s -w" -o "$dir/bin/helm" "$mod/cmd/helm"
  )
  echo "$key" >"$dir/.built"
  say "helm: done -> $dir/bin/helm"
}

build_cdi() {
  local dir="$cache/cdi-$CDI_VERSION" key="cdi=$CDI_VERSION script=1"
  if done_stamp "$dir" "$key"; then say "cdi $CDI_VERSION: cached"; return; fi
  say "cdi $CDI_VERSION: building the cdi command"
  rm -rf "$dir/src" && mkdir -p "$dir/src" "$dir/bin"
  printf 'module gpudra.local/peers/cdi\n\ngo 1.24\n\nrequire %s %s\n' "$CDI_CMD_MODULE" "$CDI_VERSION" >"$dir/src/go.mod"
  (
    cd "$dir/src"
    go get "$CDI_CMD_MODULE@$CDI_VERSION" >/dev/null 2>&1 || true
    go build -ldflags="-s -w" -o "$dir/bin/cdi" "$CDI_CMD_MODULE"
  )
  echo "$key" >"$dir/.built"
  say "cdi: done -> $dir/bin/cdi"
}

build_mocknvml() {
  local dir="$cache/mocknvml-$MOCKNVML_VERSION" key="mocknvml=$MOCKNVML_VERSION script=1"
  if done_stamp "$dir" "$key"; then say "mock NVML $MOCKNVML_VERSION: cached"; return; fi
  say "mock NVML $MOCKNVML_VERSION: building libnvidia-ml.so.1"
  "$here/build-mocknvml.sh" "$dir"
  echo "$key" >"$dir/.built"
  say "mock NVML: done -> $dir/lib/libnvidia-ml.so.1"
}

targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(all)
for t in "${targets[@]}"; do
  case $t in
    k8s) build_k8s "$K8S_VERSION" ;;
    helm) build_helm ;;
    cdi) build_cdi ;;
    mocknvml) build_mocknvml ;;
    all) build_k8s "$K8S_VERSION"; build_helm; build_cdi; build_mocknvml ;;
    *) echo "unknown peer '$t' (want k8s, helm, cdi, mocknvml or all)" >&2; exit 2 ;;
  esac
done
