#!/usr/bin/env bash
# Build a demo pool under ./demo from four sparse image files of uneven sizes, create a parity
# volume and a mirror volume, mount the pool, put ext4 on vol0 through a loop device, and check
# that 64 MiB of random data reads back intact after the caches are dropped.
# Run through `make demo` (as root); tear down with `make demo-clean`.
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
DEMO="$REPO/demo"
MNT="$DEMO/mnt"
FS="$DEMO/fs"
# The CLI; overridable (BLOCKSPACE=/path/to/blockspace) to try this script against another build.
BS="${BLOCKSPACE:-$REPO/.venv/bin/blockspace}"
export BLOCKSPACE_STATE_DIR="$DEMO/state"

STEP="start"
step() {
    STEP="$*"
    printf '\n==> %s\n' "$*"
}
on_error() {
    local rc=$?
    printf '\ndemo: FAILED at step: %s (line %s, exit %s)\n' "$STEP" "$1" "$rc" >&2
    printf 'demo: clean up with: make demo-clean\n' >&2
    exit "$rc"
}
trap 'on_error $LINENO' ERR

die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

# Is PATH a mount point? Read from mountinfo, never stat PATH: a FUSE mount whose daemon died
# answers ENOTCONN to stat.
is_mounted() {
    local p
    p="$(printf '%s' "$1" | sed 's/\\/\\134/g; s/ /\\040/g; s/\t/\\011/g')"
    awk -v p="$p" '$5 == p { found = 1 } END { exit !found }' /proc/self/mountinfo
}

# Loop devices whose backing file is under DIR.
loops_under() {
    local f back
    for f in /sys/block/loop*/loop/backing_file; do
        [ -r "$f" ] || continue
        back="$(cat "$f" 2>/dev/null || true)"
        back="${back% (deleted)}"
        case "$back" in
            "$1"/*) f="${f#/sys/block/}"; printf '/dev/%s\n' "${f%%/*}" ;;
        esac
    done
}

# --- preconditions ---------------------------------------------------------------------------
step "checking prerequisites"
[ "$(id -u)" -eq 0 ] || die "must run as root (mounts, loop devices): sudo make demo"
if is_mounted "$FS" || is_mounted "$MNT" || [ -n "$(loops_under "$DEMO")" ]; then
    die "a previous demo is still mounted under $DEMO: run 'make demo-clean' first"
fi
if [ -e "$DEMO" ]; then
    die "$DEMO exists from a previous demo: run 'make demo-clean' first"
fi
[ -x "$BS" ] || die "$BS not found: run 'make setup' (or 'make demo') first"
for tool in truncate losetup mkfs.ext4 mount umount sha256sum fusermount3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found: run 'make setup'"
done
[ -e /dev/fuse ] || die "/dev/fuse missing (modprobe fuse)"
[ -e /dev/loop-control ] || die "/dev/loop-control missing (modprobe loop)"
echo "ok (state dir: $BLOCKSPACE_STATE_DIR)"

# --- the pool ---------------------------------------------------------------------------------
step "creating sparse disk images in $DEMO: 2G 2G 3G 4G"
mkdir -p "$DEMO" "$MNT" "$FS" "$BLOCKSPACE_STATE_DIR"
sizes=(2G 2G 3G 4G)
disks=()
for i in "${!sizes[@]}"; do
    truncate -s "${sizes[$i]}" "$DEMO/disk$i.img"
    disks+=("$DEMO/disk$i.img")
done
ls -ls "${disks[@]}"

step "blockspace pool create demo --slab-size 64M --media hdd <4 disks>"
"$BS" pool create demo --slab-size 64M --media hdd "${disks[@]}"

step "blockspace volume create demo vol0 --size 4G --resiliency parity --parity 1"
"$BS" volume create demo vol0 --size 4G --resiliency parity --parity 1

step "blockspace volume create demo vol1 --size 1G --resiliency mirror --copies 2 --provisioning fixed"
"$BS" volume create demo vol1 --size 1G --resiliency mirror --copies 2 --provisioning fixed

step "blockspace pool status demo"
"$BS" pool status demo

step "blockspace mount demo $MNT"
"$BS" mount demo "$MNT"
for _ in $(seq 50); do
    [ -e "$MNT/vol0" ] && break
    sleep 0.2
done
[ -e "$MNT/vol0" ] || die "$MNT/vol0 did not appear after mount"
ls -l "$MNT"

# --- a filesystem on vol0 ---------------------------------------------------------------------
step "losetup -f --show --direct-io=on $MNT/vol0"
LOOP="$(losetup -f --show --direct-io=on "$MNT/vol0")"
echo "$LOOP" > "$DEMO/loopdev"
echo "$LOOP (recorded in $DEMO/loopdev)"

step "mkfs.ext4 -q $LOOP"
# nodiscard: discard through the loop device cannot reach the daemon (no fallocate in pyfuse3).
mkfs.ext4 -q -E nodiscard "$LOOP"

step "mount $LOOP $FS"
mount "$LOOP" "$FS"
df -h "$FS"

# --- data check ---------------------------------------------------------------------------------
step "writing 64 MiB of random data to $FS/random.bin"
want="$(head -c $((64 * 1024 * 1024)) /dev/urandom | tee "$FS/random.bin" | sha256sum | cut -d' ' -f1)"
echo "$want  random.bin" > "$DEMO/random.sha256"
echo "sha256 $want"

step "sync and drop caches"
sync
if ! echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then
    echo "(could not drop caches: /proc/sys/vm/drop_caches not writable; reading back anyway)"
fi

step "reading back and comparing sha256"
got="$(sha256sum "$FS/random.bin" | cut -d' ' -f1)"
echo "sha256 $got"
if [ "$got" = "$want" ]; then
    echo "OK: data read back intact"
    verdict=0
else
    echo "FAIL: checksum mismatch (wrote $want, read $got)" >&2
    verdict=1
fi

step "blockspace pool status demo"
"$BS" pool status demo

cat <<EOF

The demo pool is up:
  disks        $DEMO/disk{0..3}.img (sparse: 2G 2G 3G 4G)
  volumes      $MNT/vol0 (parity, 4G), $MNT/vol1 (mirror x2, 1G)
  filesystem   ext4 on $LOOP (vol0) mounted at $FS
  CLI          BLOCKSPACE_STATE_DIR=$BLOCKSPACE_STATE_DIR $BS pool status demo

Tear it all down with: make demo-clean
EOF
[ "$verdict" -eq 0 ] || { STEP="data check"; printf '\ndemo: FAILED at step: data check\n' >&2; exit 1; }
