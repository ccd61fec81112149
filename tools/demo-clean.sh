#!/usr/bin/env bash
# Tear down what tools/demo.sh built: unmount the filesystems under ./demo, detach the loop
# devices backed by files under ./demo, unmount the pool (demo/mnt), then remove ./demo.
# Safe to run twice; touches nothing outside ./demo.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
DEMO="$REPO/demo"
MNT="$DEMO/mnt"
BS="${BLOCKSPACE:-$REPO/.venv/bin/blockspace}"
export BLOCKSPACE_STATE_DIR="$DEMO/state"

say() { printf 'demo-clean: %s\n' "$*"; }

case "$DEMO" in
    /*/demo) ;;
    *) say "refusing: unexpected demo path '$DEMO'"; exit 1 ;;
esac

if [ ! -e "$DEMO" ] && [ ! -L "$DEMO" ]; then
    say "nothing to clean ($DEMO does not exist)"
    exit 0
fi
if [ -L "$DEMO" ] || [ ! -d "$DEMO" ]; then
    say "refusing: $DEMO is not a plain directory"
    exit 1
fi

# Mount points at or under $DEMO, deepest first. Read from mountinfo (never stat a mount point:
# a FUSE mount whose daemon died answers ENOTCONN). Paths there escape space, tab, \ and newline.
mounts_under() {
    awk -v d="$DEMO" '
        function unescape(s,   out, i, c) {
            out = ""
            for (i = 1; i <= length(s); i++) {
                c = substr(s, i, 1)
                if (c == "\\" && substr(s, i + 1, 3) ~ /^[0-7][0-7][0-7]$/) {
                    out = out sprintf("%c", (substr(s, i + 1, 1) * 64) + (substr(s, i + 2, 1) * 8) + substr(s, i + 3, 1))
                    i += 3
                } else {
                    out = out c
                }
            }
            return out
        }
        { p = unescape($5); if (p == d || index(p, d "/") == 1) print length(p) "\t" p }
    ' /proc/self/mountinfo | sort -rn | cut -f2-
}

is_mounted() {
    local m
    while IFS= read -r m; do
        [ "$m" = "$1" ] && return 0
    done < <(mounts_under)
    return 1
}

# Loop devices whose backing file is under $DEMO (the demo's volume files, or its disk images).
loops_under_demo() {
    local f back dev
    for f in /sys/block/loop*/loop/backing_file; do
        [ -r "$f" ] || continue
        back="$(cat "$f" 2>/dev/null || true)"
        back="${back% (deleted)}"
        case "$back" in
            "$DEMO"/*) dev="${f#/sys/block/}"; printf '/dev/%s\n' "${dev%%/*}" ;;
        esac
    done
}

unmount_path() {
    local m="$1" try
    for try in 1 2 3; do
        umount "$m" 2>/dev/null && { say "unmounted $m"; return 0; }
        is_mounted "$m" || return 0
        sleep "$try"
    done
    say "$m is busy; lazy unmount"
    umount -l "$m" || say "could not unmount $m"
}

# 1. Filesystems mounted under ./demo (demo/fs), except the pool itself, deepest first.
while IFS= read -r m; do
    [ "$m" = "$MNT" ] && continue
    unmount_path "$m"
done < <(mounts_under)

# 2. Loop devices: the one recorded by demo.sh, and any backed by a file under ./demo.
#    A recorded device is detached only if it is still backed by a file under ./demo.
loops="$(loops_under_demo)"
if [ -s "$DEMO/loopdev" ]; then
    rec="$(head -n1 "$DEMO/loopdev")"
    if [ -n "$rec" ] && ! grep -qxF -- "$rec" <<<"$loops"; then
        say "recorded loop device $rec is no longer backed by the demo; leaving it alone"
    fi
fi
while IFS= read -r dev; do
    [ -n "$dev" ] || continue
    for try in 1 2 3; do
        if losetup -d "$dev" 2>/dev/null; then
            say "detached $dev"
            break
        fi
        sleep "$try"
    done
done <<<"$loops"
rm -f "$DEMO/loopdev"

# 3. The pool's FUSE mount: the CLI first, then fusermount3, then a lazy unmount.
if is_mounted "$MNT"; then
    if [ -x "$BS" ]; then
        timeout 60 "$BS" unmount "$MNT" || say "blockspace unmount failed; trying fusermount3"
    fi
    if is_mounted "$MNT"; then
        fusermount3 -u "$MNT" 2>/dev/null || fusermount3 -u -z "$MNT" 2>/dev/null \
            || umount -l "$MNT" 2>/dev/null || true
    fi
    if is_mounted "$MNT"; then
        say "could not unmount $MNT"
    else
        say "unmounted $MNT"
    fi
fi

# 4. Remove ./demo, but never while anything is still mounted under it.
left="$(mounts_under)"
if [ -n "$left" ]; then
    say "still mounted under $DEMO, not removing it:"
    printf '  %s\n' "$left"
    exit 1
fi
rm -rf --one-file-system -- "$DEMO"
say "removed $DEMO"
