#!/usr/bin/env bash
# `make k8s-testenv`: the real Kubernetes API server the operator's integration tests run against.
#
# Builds kube-apiserver and kube-controller-manager (garbage collection) ONCE into
# $K8S_DIR/bin (default target/k8s/bin) and does nothing when both are there. The tests start
# them themselves (controller/tests/support/apiserver.rs), on free 127.0.0.1 ports only.
#
# Everything comes through the ordinary apt client (Debian 12):
#   - etcd-server 3.4                  etcd, run by the tests
#   - openssl                          the tests' throw-away PKI
#   - kubernetes 1.20.2 *source*       `apt-get source`: the upstream tree with vendor/ (Debian
#                                      builds only kubectl from it); unmodified except:
#   - golang-github-modern-go-reflect2-dev, golang-github-json-iterator-go-dev
#                                      their sources replace the vendored reflect2 1.0.1 /
#                                      json-iterator: with Go >= 1.18, 1.0.1 makes kube-apiserver
#                                      segfault on the first custom resource (map iteration)
#   - golang-1.19-go, rsync, make      the build
# The deb-src lines are derived from the machine's own apt sources into a PRIVATE apt
# configuration under $K8S_DIR/apt: nothing is written to /etc, no mirror is named here.
#
# Cold build ~6 min on 2 cores (log: $K8S_DIR/build.log); the Go cache stays in $K8S_DIR/gocache.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
K8S_DIR="${K8S_DIR:-$repo/target/k8s}"
BIN="$K8S_DIR/bin"
SRC="$K8S_DIR/src"
GO=/usr/lib/go-1.19/bin
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo

log() { echo "[k8s-testenv $(date +%T)] $*" >&2; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
apt_install() {
  local need=() p
  for p in "$@"; do installed "$p" || need+=("$p"); done
  [ ${#need[@]} -eq 0 ] && return 0
  log "apt-get install ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

# What running the tests needs, every time (cheap when present).
apt_install etcd-server openssl

if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ]; then
  exit 0
fi

started=$(date +%s)
apt_install golang-1.19-go rsync make golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
mkdir -p "$BIN" "$SRC"

# ------------------------------------------------------------------ the source package
if ! ls "$SRC"/kubernetes_1.20.*.orig.tar.gz >/dev/null 2>&1; then
  apt="$K8S_DIR/apt"
  mkdir -p "$apt/sources.list.d" "$apt/lists/partial" "$apt/cache/archives/partial"
  : > "$apt/sources.list"
  # deb-src twins of the machine's deb sources (deb822 and one-line formats)
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    sed -E 's/^Types:.*/Types: deb-src/' "$f"; echo
  done > "$apt/sources.list.d/debsrc.sources"
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | sed -nE 's/^deb[[:space:]]/deb-src /p' > "$apt/sources.list" || true
  opts=(-o Dir::Etc::SourceList="$apt/sources.list" -o Dir::Etc::SourceParts="$apt/sources.list.d"
        -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache" -o APT::Sandbox::User=root)
  log "apt-get source kubernetes (private apt configuration in $apt)"
  apt-get "${opts[@]}" update -qq
  ( cd "$SRC" && apt-get "${opts[@]}" source --download-only -qq kubernetes )
  ls "$SRC"/kubernetes_1.20.*.orig.tar.gz >/dev/null 2>&1 \
    || { log "apt-get source gave no kubernetes 1.20 orig tarball: $(ls "$SRC")"; exit 1; }
fi

tree="$SRC/tree"
if [ ! -f "$tree/.extracted" ]; then
  rm -rf "$tree" && mkdir -p "$tree"
  tar xzf "$SRC"/kubernetes_1.20.*.orig.tar.gz -C "$tree" --strip-components=1
  for m in github.com/modern-go/reflect2 github.com/json-iterator/go; do
    find "$tree/vendor/$m" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) -delete
    find "/usr/share/gocode/src/$m" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) \
      ! -name '*_test.go' -exec cp {} "$tree/vendor/$m/" \;
  done
  touch "$tree/.extracted"
fi

# ------------------------------------------------------------------ the build
log "building kube-apiserver + kube-controller-manager (~6 min cold on 2 cores; log $K8S_DIR/build.log)"
mkdir -p "$tree/.go/src/k8s.io" "$K8S_DIR/home"
ln -sfn ../../.. "$tree/.go/src/k8s.io/kubernetes"
( cd "$tree" && env PATH="$GO:$PATH" GOPATH="$tree/.go" GOCACHE="$K8S_DIR/gocache" CGO_ENABLED=0 \
    GOFLAGS= HOME="$K8S_DIR/home" nice -n 10 \
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >"$K8S_DIR/build.log" 2>&1 ) \
  || { tail -30 "$K8S_DIR/build.log" >&2; exit 1; }
for b in kube-apiserver kube-controller-manager; do
  cp "$tree/_output/bin/$b" "$BIN/$b.new" && mv "$BIN/$b.new" "$BIN/$b"
done
log "built in $(( $(date +%s) - started )) s: $("$BIN/kube-apiserver" --version)"
