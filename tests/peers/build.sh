#!/usr/bin/env bash
# Builds the real test peers from Go modules, pinned, cached by version under ~/.cache.
# Usage: tests/peers/build.sh [k8s|kubelet|kubelet-v1beta1|k8s-resolve|helm|mocknvml|cdi|containerd|runc|cni|pause|node|
#        promtool|all] ... (default: all). kubelet-v1beta1: the 1.32 kubelet of K8S_KUBELET_V1BETA1.
#        k8s-resolve only checks that K8S_VERSION's modules resolve (no build).
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
# The first call per DIR takes an exclusive lock on it (held until the script exits), so that
# concurrent test sessions wait for one build instead of deleting each other's work.
declare -A locked=()
done_stamp() {
  if [[ -z ${locked[$1]:-} ]]; then
    mkdir -p "$1"
    local fd
    exec {fd}>"$1.lock"
    if ! flock -n "$fd"; then
      say "$(basename "$1"): another build holds $1.lock; waiting for it"
      flock "$fd"
    fi
    locked[$1]=$fd
  fi
  [[ -f "$1/.built" && "$(cat "$1/.built")" == "$2" ]]
}

# k8s_module VER DIR [PKG...]: write DIR/go.mod (k8s.io/kubernetes VER, its staging modules at their
# published tags, etcd at the server version Kubernetes itself requires) and DIR/cmd/etcd; `go get`
# PKG... (default: the control plane's commands and etcd); print the etcd version. The versions
# resolved depend on go.mod alone, so the kubelet's module matches the control plane's. Never `go mod tidy` this module: nothing
# in it imports k8s.io/kubernetes, so tidy drops the pin and the next build resolves a newer release.
k8s_module() {
  local ver=$1 dir=$2
  shift 2
  local gomod gover etcd_ver
  # k8s.io/kubernetes names its staging modules at v0.0.0 with local replaces; point them at the
  # published tags of the same release instead.
  gomod=$(go mod download -json "k8s.io/kubernetes@$ver" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  gover=$(awk '$1=="go"{print $2; exit}' "$gomod")
  etcd_ver=$(awk '$1=="go.etcd.io/etcd/server/v3"{print $2; exit}' "$gomod")
  [[ -n $etcd_ver ]] || { echo "k8s.io/kubernetes@$ver go.mod names no go.etcd.io/etcd/server/v3; cannot pin etcd" >&2; exit 1; }
  mkdir -p "$dir/cmd/etcd"
  {
    printf 'module gpudra.local/peers/k8s\n\ngo %s\n\nrequire (\n\tk8s.io/kubernetes %s\n\tgo.etcd.io/etcd/server/v3 %s\n)\n\n' \
      "$gover" "$ver" "$etcd_ver"
    grep -E '^\s+k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" \
      | awk -v v="v0.${ver#v1.}" '{print "replace " $1 " => " $1 " " v}'
  } >"$dir/go.mod"
  cat >"$dir/cmd/etcd/main.go" <<'GO'
// Command etcd is etcd's server entry point, built at the version Kubernetes pins.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  local pkgs=("$@")
  [[ ${#pkgs[@]} -gt 0 ]] || pkgs=("k8s.io/kubernetes/cmd/kube-apiserver@$ver" "k8s.io/kubernetes/cmd/kube-scheduler@$ver"
    "k8s.io/kubernetes/cmd/kube-controller-manager@$ver" "go.etcd.io/etcd/server/v3/etcdmain@$etcd_ver")
  (cd "$dir" && go get "${pkgs[@]}" >"$dir/get.log" 2>&1) || { cat "$dir/get.log" >&2; exit 1; }
  echo "$etcd_ver"
}

# k8s_version_ldflags VER: stamp the release version as Kubernetes' own build does
# (hack/lib/version.sh), so /version reports v1.36.3 and not v0.0.0-master: Helm's kubeVersion
# check, clients and the kubelet's node status read it.
k8s_version_ldflags() {
  local ver=$1 kminor pkg vflags=""
  kminor=${ver#v1.}
  kminor=${kminor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    vflags+=" -X $pkg.gitVersion=$ver -X $pkg.gitMajor=1 -X $pkg.gitMinor=$kminor -X $pkg.gitTreeState=clean"
  done
  printf '%s' "$vflags"
}

build_k8s() {
  local ver=$1
  local dir="$cache/k8s-$ver" key="k8s=$ver etcd=k8s-pinned version-stamped script=4"
  if done_stamp "$dir" "$key"; then say "kubernetes $ver: cached in $dir/bin"; return; fi
  say "kubernetes $ver: building etcd, kube-apiserver, kube-scheduler, kube-controller-manager (cold: ~6 min on 2 cores, warm Go cache: ~1 min)"
  rm -rf "$dir/src" "$dir/.built" && mkdir -p "$dir/src" "$dir/bin"
  say "kubernetes $ver: resolving modules"
  local etcd_ver
  etcd_ver=$(k8s_module "$ver" "$dir/src")
  (
    cd "$dir/src"
    local got
    got=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
    [[ $got == "$etcd_ver" ]] || { echo "etcd resolved to $got, want $etcd_ver" >&2; exit 1; }
    local vflags
    vflags=$(k8s_version_ldflags "$ver")
    for cmd in kube-apiserver kube-scheduler kube-controller-manager; do
      say "kubernetes $ver: go build $cmd"
      go build -ldflags="-s -w$vflags" -o "$dir/bin/$cmd" "k8s.io/kubernetes/cmd/$cmd"
    done
    say "kubernetes $ver: go build etcd"
    go build -ldflags='-s -w' -o "$dir/bin/etcd" ./cmd/etcd
  )
  echo "$key" >"$dir/.built"
  say "kubernetes $ver: done -> $dir/bin"
}

# build_kubelet VER: the real kubelet from the same module and pin as the control plane (so the Go
# build cache of that build is reused), plus fakecri (tests/peers/fakecri) over
# k8s.io/cri-client/pkg/fake, the runtime a test node's kubelet talks to.
build_kubelet() {
  local ver=$1
  local dir="$cache/kubelet-$ver"
  local key="kubelet=$ver fakecri=$(sha256sum "$here/fakecri/main.go" | cut -c1-16) script=1"
  if done_stamp "$dir" "$key"; then say "kubelet $ver: cached in $dir/bin"; return; fi
  say "kubelet $ver: building kubelet and fakecri (warm Go cache from the control plane build: ~2 min on 2 cores)"
  rm -rf "$dir/src" "$dir/.built" && mkdir -p "$dir/src/cmd/fakecri" "$dir/bin"
  cp "$here/fakecri/main.go" "$dir/src/cmd/fakecri/main.go"
  say "kubelet $ver: resolving modules"
  k8s_module "$ver" "$dir/src" "k8s.io/kubernetes/cmd/kubelet@$ver" >/dev/null
  (
    cd "$dir/src"
    local vflags
    vflags=$(k8s_version_ldflags "$ver")
    say "kubelet $ver: go build kubelet"
    go build -ldflags="-s -w$vflags" -o "$dir/bin/kubelet" "k8s.io/kubernetes/cmd/kubelet"
    say "kubelet $ver: go build fakecri"
    go build -ldflags="-s -w" -o "$dir/bin/fakecri" ./cmd/fakecri
  )
  echo "$key" >"$dir/.built"
  say "kubelet $ver: done -> $dir/bin"
}

# k8s_resolve VER: only writes and tidies the go.mod for VER (no build); proves a version is buildable.
k8s_resolve() {
  local ver=$1 tmp etcd_ver
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  etcd_ver=$(k8s_module "$ver" "$tmp")
  (cd "$tmp" && go list -deps k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kube-controller-manager ./cmd/etcd >/dev/null)
  say "kubernetes $ver: go.mod resolves (etcd $etcd_ver)"
}

build_helm() {
  local dir="$cache/helm-$HELM_VERSION" key="helm=$HELM_MODULE@$HELM_VERSION script=2"
  if done_stamp "$dir" "$key"; then say "helm $HELM_VERSION: cached"; return; fi
  say "helm $HELM_VERSION: building (cold: a few minutes)"
  rm -rf "$dir/src" "$dir/.built" && mkdir -p "$dir/src" "$dir/bin"
  printf 'module gpudra.local/peers/helm\n\ngo 1.26\n\nrequire %s %s\n' "$HELM_MODULE" "$HELM_VERSION" >"$dir/src/go.mod"
  (
    cd "$dir/src"
    go get "$HELM_MODULE/cmd/helm@$HELM_VERSION" >"$dir/get.log" 2>&1 || { cat "$dir/get.log" >&2; exit 1; }
    go build -ldflags="-s -w -X helm.sh/helm/${HELM_MODULE##*/}/internal/version.version=$HELM_VERSION" \
      -o "$dir/bin/helm" "$HELM_MODULE/cmd/helm"
  )
  echo "$key" >"$dir/.built"
  say "helm: done -> $dir/bin/helm"
}

build_cdi() {
  local dir="$cache/cdi-$CDI_VERSION" key="cdi=$CDI_MODULE@$CDI_VERSION script=2"
  if done_stamp "$dir" "$key"; then say "cdi $CDI_VERSION: cached"; return; fi
  say "cdi $CDI_VERSION: building the cdi command on $CDI_MODULE/pkg/cdi"
  rm -rf "$dir/src" "$dir/.built" && mkdir -p "$dir/src" "$dir/bin"
  printf 'module gpudra.local/peers/cdi\n\ngo 1.26\n\nrequire %s %s\n' "$CDI_MODULE" "$CDI_VERSION" >"$dir/src/go.mod"
  cat >"$dir/src/main.go" <<'GO'
// Command cdi checks CDI spec directories and resolves CDI device names with the CDI project's
// own library (the code container runtimes use), so tests need not trust our reading of the spec.
//
//	cdi validate DIR...                        load every spec; print errors; exit 1 on any
//	cdi devices DIR...                         print the fully qualified device names, one a line
//	cdi inject --spec-dirs DIR[:DIR] DEVICE... apply the devices' edits to an empty OCI spec; print it
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"

	oci "github.com/opencontainers/runtime-spec/specs-go"
	"tags.cncf.io/container-device-interface/pkg/cdi"
)

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "cdi: "+format+"\n", args...)
	os.Exit(1)
}

func load(dirs []string) *cdi.Cache {
	if len(dirs) == 0 {
		fail("name at least one spec directory")
	}
	c, err := cdi.NewCache(cdi.WithSpecDirs(dirs...), cdi.WithAutoRefresh(false))
	if err != nil && c == nil {
		fail("loading %v: %v", dirs, err)
	}
	return c
}

func report(c *cdi.Cache) int {
	bad := 0
	errs := c.GetErrors()
	paths := make([]string, 0, len(errs))
	for p := range errs {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, p := range paths {
		for _, e := range errs[p] {
			fmt.Fprintf(os.Stderr, "%s: %v\n", p, e)
			bad++
		}
	}
	return bad
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: cdi validate|devices|inject ...")
	}
	switch os.Args[1] {
	case "validate":
		c := load(os.Args[2:])
		if report(c) > 0 {
			os.Exit(1)
		}
		fmt.Printf("ok: %d devices\n", len(c.ListDevices()))
	case "devices":
		c := load(os.Args[2:])
		for _, d := range c.ListDevices() {
			fmt.Println(d)
		}
	case "inject":
		args := os.Args[2:]
		if len(args) < 3 || args[0] != "--spec-dirs" {
			fail("usage: cdi inject --spec-dirs DIR[:DIR] DEVICE...")
		}
		c := load(strings.Split(args[1], ":"))
		spec := &oci.Spec{Process: &oci.Process{}, Linux: &oci.Linux{}}
		unresolved, err := c.InjectDevices(spec, args[2:]...)
		if err != nil {
			report(c)
			fail("injecting %v (unresolved %v): %v", args[2:], unresolved, err)
		}
		out, _ := json.MarshalIndent(spec, "", "  ")
		fmt.Println(string(out))
	default:
		fail("unknown command %q (want validate, devices or inject)", os.Args[1])
	}
}
GO
  (
    cd "$dir/src"
    go mod tidy >/dev/null 2>"$dir/tidy.log" || { cat "$dir/tidy.log" >&2; exit 1; }
    go build -ldflags="-s -w" -o "$dir/bin/cdi" .
  )
  echo "$key" >"$dir/.built"
  say "cdi: done -> $dir/bin/cdi"
}

build_promtool() {
  local dir="$cache/promtool-$PROMETHEUS_VERSION"
  local key="promtool=$PROMETHEUS_MODULE@$PROMETHEUS_VERSION tags=$PROMTOOL_TAGS script=1"
  if done_stamp "$dir" "$key"; then say "promtool $PROMETHEUS_VERSION: cached"; return; fi
  say "promtool $PROMETHEUS_VERSION: building from $PROMETHEUS_MODULE (cold: a few minutes)"
  rm -rf "$dir/src" "$dir/.built" && mkdir -p "$dir/src" "$dir/bin"
  printf 'module gpudra.local/peers/promtool\n\ngo 1.26\n\nrequire %s %s\n' "$PROMETHEUS_MODULE" "$PROMETHEUS_VERSION" >"$dir/src/go.mod"
  (
    cd "$dir/src"
    GOFLAGS="$GOFLAGS -tags=$PROMTOOL_TAGS" go get "$PROMETHEUS_MODULE/cmd/promtool@$PROMETHEUS_VERSION" \
      >"$dir/get.log" 2>&1 || { cat "$dir/get.log" >&2; exit 1; }
    go build -tags "$PROMTOOL_TAGS" -ldflags="-s -w" -o "$dir/bin/promtool" "$PROMETHEUS_MODULE/cmd/promtool"
  )
  echo "$key" >"$dir/.built"
  say "promtool: done -> $dir/bin/promtool"
}

build_mocknvml() {
  local dir="$cache/mocknvml-go-nvml-$GO_NVML_VERSION"
  local key="go-nvml=$GO_NVML_VERSION bridge=$(sha256sum "$here/build-mocknvml.sh" | cut -c1-16)"
  if done_stamp "$dir" "$key"; then say "mock NVML (go-nvml $GO_NVML_VERSION): cached"; return; fi
  say "mock NVML (go-nvml $GO_NVML_VERSION): building libnvidia-ml.so.1"
  rm -rf "$dir/.built"
  GO_NVML_MODULE=$GO_NVML_MODULE GO_NVML_VERSION=$GO_NVML_VERSION "$here/build-mocknvml.sh" "$dir"
  echo "$key" >"$dir/.built"
  say "mock NVML: done -> $dir/lib/libnvidia-ml.so.1"
}

# debs_into DIR PKG...: download Debian packages (the host's apt sources, no install) and unpack them
# under DIR; prints what it fetched. Nothing on the host changes.
debs_into() {
  local dir=$1
  shift
  mkdir -p "$dir/debs"
  (cd "$dir/debs" && apt-get download -q "$@" >"$dir/debs/download.log" 2>&1) \
    || { cat "$dir/debs/download.log" >&2; echo "apt-get download $* failed (run apt-get update?)" >&2; exit 1; }
  local deb
  for deb in "$dir"/debs/*.deb; do dpkg-deb -x "$deb" "$dir/sysroot"; say "  unpacked $(basename "$deb")"; done
}

build_containerd() {
  local dir="$cache/containerd-$CONTAINERD_VERSION" key="containerd=$CONTAINERD_MODULE@$CONTAINERD_VERSION script=1"
  if done_stamp "$dir" "$key"; then say "containerd $CONTAINERD_VERSION: cached"; return; fi
  say "containerd $CONTAINERD_VERSION: building containerd, ctr, containerd-shim-runc-v2 (cold: ~4 min on 2 cores)"
  rm -rf "$dir/src" "$dir/.built" && mkdir -p "$dir/src" "$dir/bin"
  printf 'module gpudra.local/peers/containerd\n\ngo 1.26\n\nrequire %s %s\n' "$CONTAINERD_MODULE" "$CONTAINERD_VERSION" >"$dir/src/go.mod"
  (
    cd "$dir/src"
    go get "$CONTAINERD_MODULE/cmd/containerd@$CONTAINERD_VERSION" >"$dir/get.log" 2>&1 || { cat "$dir/get.log" >&2; exit 1; }
    local ld="-s -w -X $CONTAINERD_MODULE/version.Version=$CONTAINERD_VERSION -X $CONTAINERD_MODULE/version.Package=$CONTAINERD_MODULE"
    for cmd in containerd ctr containerd-shim-runc-v2; do
      say "containerd: go build $cmd"
      CGO_ENABLED=0 go build -tags no_btrfs -ldflags="$ld" -o "$dir/bin/$cmd" "$CONTAINERD_MODULE/cmd/$cmd"
    done
  )
  echo "$key" >"$dir/.built"
  say "containerd: done -> $dir/bin"
}

# runc with seccomp: a static binary linked against libseccomp.a from Debian's libseccomp-dev,
# unpacked into a private sysroot (not installed on the host).
build_runc() {
  local dir="$cache/runc-$RUNC_VERSION" key="runc=$RUNC_MODULE@$RUNC_VERSION seccomp static script=1"
  if done_stamp "$dir" "$key"; then say "runc $RUNC_VERSION: cached"; return; fi
  say "runc $RUNC_VERSION: building static runc with seccomp (cold: ~1 min)"
  rm -rf "$dir/src" "$dir/sysroot" "$dir/debs" "$dir/.built" && mkdir -p "$dir/src" "$dir/bin" "$dir/sysroot"
  debs_into "$dir" libseccomp-dev libseccomp2
  local sysroot="$dir/sysroot" arch
  arch=$(gcc -print-multiarch)
  [[ -f "$sysroot/usr/lib/$arch/libseccomp.a" ]] || { echo "libseccomp-dev holds no libseccomp.a for $arch" >&2; exit 1; }
  printf 'module gpudra.local/peers/runc\n\ngo 1.26\n\nrequire %s %s\n' "$RUNC_MODULE" "$RUNC_VERSION" >"$dir/src/go.mod"
  (
    cd "$dir/src"
    go get "$RUNC_MODULE@$RUNC_VERSION" >"$dir/get.log" 2>&1 || { cat "$dir/get.log" >&2; exit 1; }
    # The .pc file names /usr; the sysroot variable points pkg-config's answers into ours.
    export PKG_CONFIG_PATH="$sysroot/usr/lib/$arch/pkgconfig" PKG_CONFIG_SYSROOT_DIR="$sysroot" PKG_CONFIG_LIBDIR=""
    CGO_ENABLED=1 go build -tags "seccomp urfave_cli_no_docs netgo osusergo" \
      -ldflags="-s -w -X main.version=${RUNC_VERSION#v} -extldflags=-static" -o "$dir/bin/runc" "$RUNC_MODULE"
  )
  "$dir/bin/runc" --version | grep -q "libseccomp: 2" || { "$dir/bin/runc" --version >&2; echo "runc built without seccomp" >&2; exit 1; }
  echo "$key" >"$dir/.built"
  say "runc: done -> $dir/bin/runc ($("$dir/bin/runc" --version | tr '\n' ' '))"
}

build_cni() {
  local dir="$cache/cni-plugins-$CNI_PLUGINS_VERSION" key="cni=$CNI_PLUGINS_MODULE@$CNI_PLUGINS_VERSION bridge,host-local,loopback script=1"
  if done_stamp "$dir" "$key"; then say "CNI plugins $CNI_PLUGINS_VERSION: cached"; return; fi
  say "CNI plugins $CNI_PLUGINS_VERSION: building bridge, host-local, loopback (cold: ~1 min)"
  rm -rf "$dir/src" "$dir/.built" && mkdir -p "$dir/src" "$dir/bin"
  printf 'module gpudra.local/peers/cni\n\ngo 1.26\n\nrequire %s %s\n' "$CNI_PLUGINS_MODULE" "$CNI_PLUGINS_VERSION" >"$dir/src/go.mod"
  (
    cd "$dir/src"
    go get "$CNI_PLUGINS_MODULE/plugins/main/bridge@$CNI_PLUGINS_VERSION" >"$dir/get.log" 2>&1 || { cat "$dir/get.log" >&2; exit 1; }
    local ld="-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$CNI_PLUGINS_VERSION"
    for p in main/bridge ipam/host-local main/loopback; do
      say "CNI plugins: go build ${p#*/}"
      CGO_ENABLED=0 go build -ldflags="$ld" -o "$dir/bin/${p#*/}" "$CNI_PLUGINS_MODULE/plugins/$p"
    done
  )
  echo "$key" >"$dir/.built"
  say "CNI plugins: done -> $dir/bin"
}

# The pod sandbox's pause binary from Kubernetes' own pause.c (k8s.io/kubernetes VER, build/pause),
# static; the image tag that release's build/pause/Makefile gives it lands in TAG beside bin/pause.
build_pause() {
  local ver=$1 src tag
  src=$(go mod download -json "k8s.io/kubernetes@$ver" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')/build/pause
  tag=$(awk -F' *[?]?= *' '$1=="TAG"{print $2; exit}' "$src/Makefile")
  [[ -n $tag ]] || { echo "no TAG in $src/Makefile" >&2; exit 1; }
  local dir="$cache/pause-$ver" key="pause=k8s.io/kubernetes@$ver tag=$tag script=1"
  if done_stamp "$dir" "$key"; then say "pause $tag: cached"; return; fi
  say "pause $tag: building static pause from $src/linux/pause.c"
  rm -rf "$dir/bin" "$dir/.built" && mkdir -p "$dir/bin"
  gcc -Os -Wall -Werror -static -DVERSION="v$tag-gpu-dra" -o "$dir/bin/pause" "$src/linux/pause.c"
  strip "$dir/bin/pause"
  echo "$tag" >"$dir/TAG"
  echo "$key" >"$dir/.built"
  say "pause: done -> $dir/bin/pause"
}

# The real node's runtime peers (tests marked real_runtime).
build_node() { build_containerd; build_runc; build_cni; build_pause "$K8S_VERSION"; }

targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(all)
for t in "${targets[@]}"; do
  case $t in
    k8s) build_k8s "$K8S_VERSION"; build_kubelet "$K8S_VERSION" ;;
    kubelet) build_kubelet "$K8S_VERSION" ;;
    kubelet-v1beta1) build_kubelet "$K8S_KUBELET_V1BETA1" ;;
    k8s-resolve) k8s_resolve "$K8S_VERSION" ;;
    helm) build_helm ;;
    cdi) build_cdi ;;
    mocknvml) build_mocknvml ;;
    containerd) build_containerd ;;
    runc) build_runc ;;
    cni) build_cni ;;
    pause) build_pause "$K8S_VERSION" ;;
    node) build_node ;;
    promtool) build_promtool ;;
    all)
      build_k8s "$K8S_VERSION"; build_kubelet "$K8S_VERSION"; build_kubelet "$K8S_KUBELET_V1BETA1"
      build_helm; build_cdi; build_mocknvml; build_node; build_promtool ;;
    *) echo "unknown peer '$t' (want k8s, kubelet, kubelet-v1beta1, k8s-resolve, helm, cdi, mocknvml, containerd, runc, cni, pause, node, promtool or all)" >&2; exit 2 ;;
  esac
done
