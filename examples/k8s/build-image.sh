#!/usr/bin/env bash
# `make image`: the image of examples/k8s/Dockerfile, built without any registry (no Docker Hub,
# no daemon) from Debian packages, as an OCI archive:
#   target/image/virtwarden-<version>.oci.tar      (load it: podman load -i …, skopeo copy oci-archive:… …)
#
# The Dockerfile is the one description of the image: this script reads its final stage — the
# Debian suite of its `FROM debian:<suite>-slim`, the packages its `apt-get install` names, the
# COPY destination of the binary, ENTRYPOINT, CMD and USER — so the two cannot drift.
#
#   - root file system: mmdebstrap (minbase + those packages; documentation, manuals and
#     locales left out like the -slim images), from the machine's OWN apt sources read at run
#     time (nothing about a mirror is written in this repository); cached as
#     target/image/rootfs-<suite>-<hash of packages>.tar and built only when missing;
#   - the binary: $1 (default target/release/virtwarden, `make image` builds it --locked);
#   - assembled with buildah in private storage under target/image (never /var/lib/containers).
#
# Usage: build-image.sh [BINARY [OUT.oci.tar]]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
IMAGE_DIR="${IMAGE_DIR:-$repo/target/image}"
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml")
binary="${1:-$repo/target/release/virtwarden}"
out="${2:-$IMAGE_DIR/virtwarden-$version.oci.tar}"
tag="virtwarden:$version"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
log() { echo "[image $(date +%T)] $*" >&2; }

# ------------------------------------------------------------------ the Dockerfile's final stage
final=$(awk '/^FROM /{stage=""} {stage = stage $0 "\n"} END {printf "%s", stage}' "$here/Dockerfile")
base=$(sed -n 's/^FROM \([^ ]*\).*/\1/p' <<<"$final")
case "$base" in
  debian:*-slim) suite=${base#debian:}; suite=${suite%-slim} ;;
  *) echo "build-image.sh: the final stage must be FROM debian:<suite>-slim, not $base" >&2; exit 1 ;;
esac
packages=$(sed -n 's/.*apt-get install -y --no-install-recommends \([a-z0-9 .+-]*\).*/\1/p' <<<"$final" | xargs)
dest=$(sed -n 's/^COPY --from=build [^ ]* \([^ ]*\)$/\1/p' <<<"$final")
entrypoint=$(sed -n 's/^ENTRYPOINT //p' <<<"$final")
cmd=$(sed -n 's/^CMD //p' <<<"$final")
user=$(sed -n 's/^USER //p' <<<"$final")
for v in packages dest entrypoint cmd user; do
  [ -n "${!v}" ] || { echo "build-image.sh: no $v in the Dockerfile's final stage" >&2; exit 1; }
done
[ -x "$binary" ] || { echo "build-image.sh: no binary $binary (cargo build --release --locked -p virtwarden)" >&2; exit 1; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
need=(); for p in mmdebstrap buildah; do installed "$p" || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# ------------------------------------------------------------------ the base root file system
mkdir -p "$IMAGE_DIR"
# minbase + the packages, merged /usr by debootstrap's method (not the usrmerge package, which
# pulls in perl), no manuals, documentation (copyrights kept) or translations, like -slim images.
mm_opts=(--variant=minbase --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias'
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright')
key=$(printf '%s\n' "$suite" $packages "${mm_opts[@]}" | sha256sum | cut -c1-12)
rootfs="$IMAGE_DIR/rootfs-$suite-$key.tar"
if [ ! -s "$rootfs" ]; then
  sources=()
  [ -s /etc/apt/sources.list ] && grep -q '^deb ' /etc/apt/sources.list && sources+=(/etc/apt/sources.list)
  for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && sources+=("$f")
  done
  [ ${#sources[@]} -gt 0 ] || { echo "build-image.sh: no apt sources on this machine" >&2; exit 1; }
  log "mmdebstrap $suite + $packages from ${sources[*]}"
  started=$(date +%s)
  mmdebstrap --quiet --format=tar "${mm_opts[@]}" --include="${packages// /,}" \
    "$suite" "$rootfs.tmp" "${sources[@]}"
  mv "$rootfs.tmp" "$rootfs"
  log "root file system in $(( $(date +%s) - started )) s: $rootfs"
fi

# ------------------------------------------------------------------ the image
B=(buildah --root "$IMAGE_DIR/storage" --runroot "$IMAGE_DIR/run" --storage-driver vfs)
ctr=$("${B[@]}" from --name "virtwarden-image-$$" scratch)
trap '"${B[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
"${B[@]}" add "$ctr" "$rootfs" / >/dev/null
"${B[@]}" copy --chmod 0755 "$ctr" "$binary" "$dest" >/dev/null
"${B[@]}" config --entrypoint "$entrypoint" --cmd "$cmd" --user "$user" \
  --label "org.opencontainers.image.title=virtwarden" --label "org.opencontainers.image.version=$version" \
  --label "io.virtwarden.packages=$packages" "$ctr"
rm -f "$out.tmp"
"${B[@]}" commit --quiet --format oci --disable-compression=false "$ctr" "oci-archive:$out.tmp:$tag" >/dev/null
mv "$out.tmp" "$out"
log "$tag: $out ($(du -m "$out" | cut -f1) MiB)"
