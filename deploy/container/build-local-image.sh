#!/usr/bin/env bash
# Assemble a CPU runtime OCI image of scfm from the binaries ALREADY BUILT in target/release
# (no Rust build, no registry, no Docker engine), import it into podman and run
# `scfm presets` and `scfm-worker --version` inside it. See deploy/container/README.md.
#
#   1. a Debian bookworm rootfs from Debian packages only (mmdebstrap, variant essential +
#      libhdf5-103-1, libstdc++6, libgomp1, ca-certificates; no docs/man/locales), cached
#      as .cache/container/base-<hash>.tar (--fresh rebuilds it);
#   2. the two binaries, stripped, in /usr/local/bin, their RUNPATH set to the copied
#      libtorch (patchelf); the libraries they link from the torch wheel (found with ldd:
#      libtorch_cpu, libc10, libgomp and, with the CUDA wheel, the nvidia/* libraries that
#      libtorch_cpu needs) under /opt with the wheel's layout (torch/lib, nvidia/...);
#   3. a user scfm (1000:1000), WORKDIR /work, CMD ["scfm", "--help"];
#   4. `podman import` into localhost/scfm:cpu-local (--tag), then `podman run`
#      (runtime runc, no network); --engine chroot (or a podman that does not work)
#      runs the binaries with chroot in the rootfs instead.
#
# stdout: the output of `scfm presets` and `scfm-worker --version` inside the image.
# stderr: progress, times and sizes. Needs root (mmdebstrap root mode, rootful podman,
# chroot); installs the Debian packages it misses: mmdebstrap, patchelf, binutils, and for
# podman: podman, runc.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)

TAG=localhost/scfm:cpu-local
BIN_DIR=$ROOT/target/release
WORK=$ROOT/.cache/container
ENGINE=auto
FRESH=0
RUN=1
SAVE=""
KEEP_ROOTFS=0
SUITE=bookworm
# Debian packages of the runtime (the binaries' NEEDED libraries outside libtorch).
PACKAGES=libhdf5-103-1,libstdc++6,libgomp1,ca-certificates

usage() {
  cat <<'EOF'
usage: deploy/container/build-local-image.sh [options]
  --tag NAME        image name (default localhost/scfm:cpu-local)
  --bin-dir DIR     folder with scfm and scfm-worker (default target/release)
  --work DIR        work folder: base rootfs cache, rootfs (default .cache/container)
  --engine E        auto | podman | chroot (default auto: podman, chroot if podman fails)
  --fresh           rebuild the cached Debian base rootfs
  --no-run          build only; do not run scfm inside the image
  --save FILE       also write the image as an OCI archive (podman save)
  --keep-rootfs     keep the assembled rootfs folder (always kept with chroot)
Environment: SCFM_DEBIAN_MIRROR (mmdebstrap mirror or sources file; default: the host's
apt sources for bookworm), SCFM_OCI_RUNTIME (podman --runtime; default runc, empty for
podman's default).
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG=$2; shift 2 ;;
    --bin-dir) BIN_DIR=$(realpath "$2"); shift 2 ;;
    --work) WORK=$(realpath -m "$2"); shift 2 ;;
    --engine) ENGINE=$2; shift 2 ;;
    --fresh) FRESH=1; shift ;;
    --no-run) RUN=0; shift ;;
    --save) SAVE=$(realpath -m "$2"); shift 2 ;;
    --keep-rootfs) KEEP_ROOTFS=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
case "$ENGINE" in auto|podman|chroot) ;; *) echo "unknown --engine $ENGINE" >&2; exit 2 ;; esac

log() { printf '[image] %s\n' "$*" >&2; }
die() { printf '[image] error: %s\n' "$*" >&2; exit 1; }
t_start=$(date +%s)
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
human() { numfmt --to=iec-i --suffix=B "$1"; }

[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap in root mode, rootful podman, chroot)"
WORKER=$BIN_DIR/scfm-worker
COORD=$BIN_DIR/scfm
for b in "$WORKER" "$COORD"; do
  [ -x "$b" ] || die "$b is missing: build first (cargo build --release --workspace)"
done

mkdir -p "$WORK"
exec 9>"$WORK/.lock"
flock -n 9 || { log "waiting for another build-local-image.sh using $WORK"; flock 9; }

# 1. Debian packages this script uses -----------------------------------------------------
t=$(now)
tools=(mmdebstrap patchelf binutils)
[ "$ENGINE" = chroot ] || tools+=(podman runc)
need=()
for p in "${tools[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  log "installing Debian packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  log "installed in $(since "$t") s"
fi

# 2. the Debian base rootfs (cached) ------------------------------------------------------
mirrors=()
if [ -n "${SCFM_DEBIAN_MIRROR:-}" ]; then
  mirrors=("$SCFM_DEBIAN_MIRROR")
else
  # The host's apt sources that name the suite (mirrors, proxies and snapshots keep working).
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && grep -qE "^[^#]*\\b$SUITE\\b" "$f" && mirrors+=("$f")
  done
fi
aptopts=()
# Snapshot mirrors serve Release files past their Valid-Until: follow the host's setting.
# (grep reads all of it: with pipefail, grep -q could make apt-config die of SIGPIPE.)
if apt-config dump 2>/dev/null | grep -i '^Acquire::Check-Valid-Until "false"' >/dev/null; then
  aptopts+=(--aptopt='Acquire::Check-Valid-Until "false"')
fi
mm_args=(
  --mode=root --variant=essential
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  --include="$PACKAGES"
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-include=/usr/share/locale/locale.alias'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  # No apt in the image (variant essential): drop the build host's sources and options.
  --customize-hook='rm -f "$1"/etc/apt/sources.list "$1"/etc/apt/sources.list.d/* "$1"/etc/apt/apt.conf.d/99mmdebstrap'
  "${aptopts[@]}"
)
key=$( { echo "$SUITE"; printf '%s\n' "${mm_args[@]}"; for m in "${mirrors[@]}"; do
         [ -f "$m" ] && cat "$m" || echo "$m"; done; } | sha256sum | cut -c1-16)
BASE=$WORK/base-$key.tar
t=$(now)
if [ "$FRESH" = 1 ] || [ ! -s "$BASE" ]; then
  log "mmdebstrap $SUITE (essential + $PACKAGES) -> $BASE"
  rm -rf "$WORK"/base-*.tar "$BASE.part"
  if ! mmdebstrap --format=tar "${mm_args[@]}" "$SUITE" "$BASE.part" "${mirrors[@]}" \
      >"$WORK/mmdebstrap.log" 2>&1; then
    tail -n 30 "$WORK/mmdebstrap.log" >&2
    die "mmdebstrap failed (log: $WORK/mmdebstrap.log)"
  fi
  mv "$BASE.part" "$BASE"
  log "base rootfs built in $(since "$t") s ($(human "$(stat -c %s "$BASE")") tar)"
else
  log "base rootfs cached: $BASE ($(human "$(stat -c %s "$BASE")") tar; --fresh rebuilds it)"
fi

# 3. assemble: base + binaries + the libtorch they link -----------------------------------
t=$(now)
ROOTFS=$WORK/rootfs
rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"
tar -C "$ROOTFS" --numeric-owner -xpf "$BASE"

# The wheel's layout is kept under /opt: libtorch_cpu's RPATH ($ORIGIN/../../nvidia/...)
# then finds the nvidia/* libraries of a CUDA wheel next to torch/.
torch_so=$(ldd "$WORKER" | awk '$1 == "libtorch_cpu.so" { print $3 }')
[ -n "$torch_so" ] && [ -f "$torch_so" ] || die "ldd $WORKER finds no libtorch_cpu.so (is .cargo/config.toml's rpath or LD_LIBRARY_PATH set?)"
TORCH_LIB=$(dirname "$(realpath -s "$torch_so")")
TORCH_ROOT=$(dirname "$TORCH_LIB")
PREFIX=$(dirname "$TORCH_ROOT")
IMAGE_TORCH_LIB=/opt/$(basename "$TORCH_ROOT")/lib
log "libtorch: $TORCH_LIB -> $IMAGE_TORCH_LIB"
copied=0
for bin in "$WORKER" "$COORD"; do
  if ldd "$bin" | grep 'not found' >/dev/null; then
    ldd "$bin" | grep 'not found' >&2
    die "$bin has unresolved libraries on this machine"
  fi
  while read -r lib; do
    lib=$(realpath -s "$lib")
    case "$lib" in
      "$PREFIX"/*)
        dest=$ROOTFS/opt/${lib#"$PREFIX"/}
        if [ ! -e "$dest" ]; then
          mkdir -p "$(dirname "$dest")"
          cp -L "$lib" "$dest"
          copied=$((copied + $(stat -c %s "$dest")))
          log "  + /opt/${lib#"$PREFIX"/}"
        fi ;;
      /lib/*|/lib64/*|/usr/lib/*|/usr/lib64/*) ;;  # from Debian packages (checked below)
      *) die "$bin links $lib, which is neither libtorch's nor a system library" ;;
    esac
  done < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }')
done
# The file that names libtorch's version, where the worker reads it at start (the folder
# above lib/): without it the worker refuses to run (a libtorch it cannot tell apart).
for f in version.py build-version; do
  if [ -f "$TORCH_ROOT/$f" ]; then cp "$TORCH_ROOT/$f" "$ROOTFS/opt/$(basename "$TORCH_ROOT")/$f"; fi
done
install -d "$ROOTFS/usr/local/bin"
for bin in "$WORKER" "$COORD"; do
  out=$ROOTFS/usr/local/bin/$(basename "$bin")
  strip -o "$out" "$bin"
  if readelf -d "$out" | grep "NEEDED.*libtorch" >/dev/null; then
    patchelf --set-rpath "$IMAGE_TORCH_LIB" "$out"
  else
    patchelf --remove-rpath "$out"
  fi
done
# Every library resolves inside the image (Debian's packages and the copied ones).
for bin in scfm scfm-worker; do
  if chroot "$ROOTFS" /usr/bin/ldd "/usr/local/bin/$bin" | grep 'not found' >&2; then
    die "/usr/local/bin/$bin has unresolved libraries in the image"
  fi
done
# The user and the working folder.
grep -q '^scfm:' "$ROOTFS/etc/group" || echo 'scfm:x:1000:' >> "$ROOTFS/etc/group"
grep -q '^scfm:' "$ROOTFS/etc/passwd" ||
  echo 'scfm:x:1000:1000:scfm:/home/scfm:/bin/bash' >> "$ROOTFS/etc/passwd"
install -d -o 1000 -g 1000 "$ROOTFS/home/scfm" "$ROOTFS/work"
VERSION=$("$COORD" --version | awk '{ print $2 }')
rootfs_bytes=$(du -sb "$ROOTFS" | cut -f1)
log "rootfs assembled in $(since "$t") s: $(human "$rootfs_bytes") ($(human "$copied") of libtorch," \
    "$(human "$(stat -c %s "$ROOTFS/usr/local/bin/scfm")") scfm," \
    "$(human "$(stat -c %s "$ROOTFS/usr/local/bin/scfm-worker")") scfm-worker)"

# 4. import into podman and run ------------------------------------------------------------
podman_run=()
if [ "$ENGINE" != chroot ]; then
  t=$(now)
  old=$(podman image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)
  if tar -C "$ROOTFS" --numeric-owner -c . | podman import \
      --change 'CMD ["scfm", "--help"]' \
      --change 'USER 1000:1000' \
      --change 'WORKDIR /work' \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'LABEL org.opencontainers.image.title=scfm' \
      --change "LABEL org.opencontainers.image.version=$VERSION" \
      --change 'LABEL org.opencontainers.image.description="scfm CPU runtime from prebuilt binaries (deploy/container/build-local-image.sh)"' \
      --quiet - "$TAG" >/dev/null; then
    new=$(podman image inspect --format '{{.Id}}' "$TAG")
    if [ -n "$old" ] && [ "$old" != "$new" ]; then podman rmi "$old" >/dev/null 2>&1 || true; fi
    size=$(podman image inspect --format '{{.Size}}' "$TAG")
    log "podman import $TAG in $(since "$t") s: image $(human "$size")"
    # runc: Debian 12's crun refuses hosts with hybrid cgroups (v1 + an unified v2
    # hierarchy). Explicit ulimits: podman's defaults (nofile 1048576) exceed what a
    # container may set where CAP_SYS_RESOURCE is missing.
    hn=$(ulimit -Hn); [ "$hn" = unlimited ] || [ "$hn" -gt 1048576 ] && hn=1048576
    hu=$(ulimit -Hu); [ "$hu" = unlimited ] || [ "$hu" -gt 32768 ] && hu=32768
    podman_run=(podman run --rm --network none --ulimit "nofile=$hn:$hn" --ulimit "nproc=$hu:$hu")
    runtime=${SCFM_OCI_RUNTIME-runc}
    [ -n "$runtime" ] && podman_run+=(--runtime "$runtime")
    if [ -n "$SAVE" ]; then
      t=$(now)
      rm -f "$SAVE"
      podman save --format oci-archive -o "$SAVE" "$TAG"
      log "saved $SAVE in $(since "$t") s ($(human "$(stat -c %s "$SAVE")"))"
    fi
  elif [ "$ENGINE" = podman ]; then
    die "podman import failed"
  else
    log "podman import failed: falling back to chroot"
  fi
fi

if [ "$RUN" = 1 ]; then
  t=$(now)
  ran=""
  if [ ${#podman_run[@]} -gt 0 ]; then
    if out=$("${podman_run[@]}" "$TAG" scfm presets 2>"$WORK/run.err"); then
      printf '%s\n' "$out"
      "${podman_run[@]}" "$TAG" scfm-worker --version
      versions=$("${podman_run[@]}" "$TAG" scfm-worker versions)
      ran="podman run ($TAG)"
    else
      cat "$WORK/run.err" >&2
      [ "$ENGINE" = podman ] && die "podman run failed"
      log "podman run failed: falling back to chroot"
    fi
  fi
  if [ -z "$ran" ]; then
    in_root=(chroot --userspec=1000:1000 "$ROOTFS" /usr/bin/env -i HOME=/home/scfm
             PATH=/usr/local/bin:/usr/bin:/bin)
    "${in_root[@]}" scfm presets
    "${in_root[@]}" scfm-worker --version
    versions=$("${in_root[@]}" scfm-worker versions)
    ran="chroot $ROOTFS (no container runtime)"
    KEEP_ROOTFS=1
  fi
  printf '%s\n' "$versions" | sed 's/^/[image] versions: /' >&2
  if printf '%s\n' "$versions" | grep 'libtorch check: FAILED' >&2; then
    die "scfm-worker would refuse the image's libtorch"
  fi
  log "ran scfm presets, scfm-worker --version and versions with $ran in $(since "$t") s"
fi
if [ "$KEEP_ROOTFS" = 0 ] && [ ${#podman_run[@]} -gt 0 ]; then
  rm -rf "$ROOTFS"
else
  KEEP_ROOTFS=1
  log "rootfs kept in $ROOTFS"
fi
log "done in $(( $(date +%s) - t_start )) s"
