#!/usr/bin/env bash
# Builds the container image from deploy/Dockerfile around an already built kvgate binary and
# checks it: the binary runs inside the image as the image's user and prints `kvgate <version>`
# (the version in Cargo.toml), the user is not root, and ports 9002, 9003 and 9090 are exposed.
#
#   ci/image-test.sh target/release/kvgate
#
# No base image can be pulled here, so both images the Dockerfile starts from are made locally
# and the build runs with --pull=never:
#   - the runtime base, tagged with the Dockerfile's RUNTIME_IMAGE: a root file system of the
#     host's own files (the loader and the libraries `ldd BINARY` lists, an /etc/passwd with the
#     user nonroot 65532, /tmp);
#   - the binary image (FROM scratch, the binary at /kvgate), passed as BINARY_IMAGE, so the
#     Rust build stage is skipped, as in a release pipeline that ships cross-built binaries.
# Uses buildah (installed from Debian when missing) with the vfs driver and chroot isolation;
# its storage is a temporary folder removed on exit, with every container and image in it.
# Prints the version line on success; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "ci/image-test.sh: $*" >&2; }
die() { log "$*"; exit 1; }
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

[ $# = 1 ] || die "usage: ci/image-test.sh BINARY"
binary=$(realpath "$1")
[ -x "$binary" ] || die "$1 is not an executable file"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
[ -n "$version" ] || die "no version in Cargo.toml"
expected="kvgate $version"
runtime_image=$(sed -n 's/^ARG RUNTIME_IMAGE=//p' deploy/Dockerfile)
[ -n "$runtime_image" ] || die "no ARG RUNTIME_IMAGE=... in deploy/Dockerfile"
binary_image=localhost/kvgate-binary:image-test
image=localhost/kvgate:image-test

if ! command -v buildah >/dev/null; then
  log "installing buildah"
  sudo_ apt-get install -y --no-install-recommends buildah >&2 ||
    { sudo_ apt-get update >&2 && sudo_ apt-get install -y --no-install-recommends buildah >&2; }
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/kvgate-image-test.XXXXXX")
bah() {
  sudo_ buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs "$@"
}
cleanup() {
  bah rm --all >/dev/null 2>&1 || true
  bah rmi --all --force >/dev/null 2>&1 || true
  sudo_ rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The runtime base: what the binary needs to start, from the host, and a non-root user.
base=$work/base
mkdir -p "$base/etc" "$base/tmp" "$base/home/nonroot"
chmod 1777 "$base/tmp"
if ldd_out=$(ldd "$binary" 2>&1); then
  libs=$(echo "$ldd_out" | grep -o '/[^ ]*' | sort -u)
else
  case $ldd_out in
    *"not a dynamic executable"* | *"statically linked"*) libs= ;;
    *) die "ldd $binary: $ldd_out" ;;
  esac
fi
for lib in $libs; do
  mkdir -p "$base$(dirname "$lib")"
  cp -L "$lib" "$base$lib"
done
cat >"$base/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
cat >"$base/etc/group" <<'GROUP'
root:x:0:
nonroot:x:65532:
GROUP
log "making the runtime base $runtime_image from $(echo "$libs" | grep -c . || true) host libraries"
ctr=$(bah from scratch)
bah copy --quiet "$ctr" "$base/" / >/dev/null
bah config --user 65532:65532 --workingdir /home/nonroot "$ctr"
bah commit --quiet "$ctr" "$runtime_image" >/dev/null
bah rm "$ctr" >/dev/null

log "making the binary image $binary_image"
mkdir -p "$work/binary"
cp "$binary" "$work/binary/kvgate"
printf 'FROM scratch\nCOPY kvgate /kvgate\n' >"$work/binary/Containerfile"
bah bud --quiet --isolation chroot --pull=never -f "$work/binary/Containerfile" \
  -t "$binary_image" "$work/binary" >/dev/null

log "building deploy/Dockerfile"
bah bud --isolation chroot --pull=never --build-arg "BINARY_IMAGE=$binary_image" \
  -f deploy/Dockerfile -t "$image" . >&2

# The image's config.
user=$(bah inspect --type image --format '{{.OCIv1.Config.User}}' "$image")
case ${user%%:*} in
  "" | 0 | root) die "the image runs as root (User: '$user')" ;;
esac
ports=$(bah inspect --type image --format '{{range $p, $_ := .OCIv1.Config.ExposedPorts}}{{$p}} {{end}}' "$image")
for port in 9002/tcp 9003/tcp 9090/tcp; do
  case " $ports" in
    *" $port "*) ;;
    *) die "port $port is not exposed (exposed: $ports)" ;;
  esac
done
entrypoint=$(bah inspect --type image --format '{{range .OCIv1.Config.Entrypoint}}{{.}} {{end}}' "$image")
[ "$entrypoint" = "/usr/local/bin/kvgate " ] || die "unexpected entrypoint '$entrypoint'"

# The binary inside the image, as the image's user.
ctr=$(bah from --pull=never "$image")
got=$(bah run --isolation chroot "$ctr" -- /usr/local/bin/kvgate --version) ||
  die "kvgate --version failed inside the image"
[ "$got" = "$expected" ] || die "kvgate --version printed '$got', expected '$expected'"
bah copy --quiet "$ctr" config/minimal.yaml /tmp/minimal.yaml >/dev/null
bah run --isolation chroot "$ctr" -- /usr/local/bin/kvgate check-config /tmp/minimal.yaml >/dev/null ||
  die "kvgate check-config failed inside the image"
log "ok: user $user, ports $ports"
echo "$got"
