#!/usr/bin/env bash
# Prepare this machine for Blockspace development, the demo and the tests:
#   1. Debian packages (only the missing ones; `apt-get update` only if something is missing),
#   2. the virtualenv $REPO/.venv with `pip install -e '.[test]'` (skipped while a stamp file
#      for the current setup.cfg exists),
#   3. the fuse and loop kernel modules, if their device nodes are missing.
# Idempotent and quick when everything is already in place. Meant to run as root on Debian 12.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
VENV="$REPO/.venv"

APT_PACKAGES=(
    fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev
    e2fsprogs xfsprogs fio liberasurecode-dev libisal-dev util-linux
    qemu-system-x86 qemu-system-common busybox-static kmod dmsetup nbdkit
    qemu-utils libnbd-bin nbd-client
)

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# Run a command as root: directly when we are root, else through sudo when there is one.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "must be root to run: $*"
    fi
}

# --- 1. Debian packages -------------------------------------------------------------------
install_apt_packages() {
    if ! command -v dpkg-query >/dev/null 2>&1; then
        say "no dpkg-query: not a Debian system, skipping system packages" \
            "(needed: ${APT_PACKAGES[*]})"
        return 0
    fi
    local missing=() pkg status
    for pkg in "${APT_PACKAGES[@]}"; do
        status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
        [ "$status" = "installed" ] || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        say "system packages: all present"
        return 0
    fi
    say "system packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}"
}

# --- 2. virtualenv ------------------------------------------------------------------------
venv_ok() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys, pip' >/dev/null 2>&1
}

create_venv() {
    local py
    py="$(command -v python3 || true)"
    [ -n "$py" ] || die "python3 not found on PATH"
    say "virtualenv: creating $VENV with $py"
    rm -rf "$VENV"
    if "$py" -m venv "$VENV"; then
        return 0
    fi
    # Usually: no ensurepip for this interpreter. The apt python3-venv package provides it for
    # the system python, so fall back to that one when python3 on PATH is another one.
    rm -rf "$VENV"
    if [ -x /usr/bin/python3 ] && [ "$(readlink -f "$py")" != "$(readlink -f /usr/bin/python3)" ]; then
        say "virtualenv: $py failed, retrying with /usr/bin/python3"
        /usr/bin/python3 -m venv "$VENV" && return 0
        rm -rf "$VENV"
    fi
    die "could not create the virtualenv (is python3-venv installed?)"
}

# An editable install's compiled modules are older than their edited sources (the package
# then runs the sources and says so): rebuild them.
compiled_build_stale() {
    (cd "$REPO" && "$VENV/bin/python" -c \
        'import sys; from blockspace.build import stale_modules; sys.exit(1 if stale_modules() else 0)' \
        2>/dev/null) && return 1
    say "python packages: the compiled modules are older than their sources"
    return 0
}

install_python_packages() {
    if venv_ok; then
        say "virtualenv: $VENV exists"
    else
        create_venv
    fi
    local hash stamp
    hash="$(cat "$REPO/setup.cfg" "$REPO/setup.py" "$REPO/pyproject.toml" | sha256sum | cut -c1-16)"
    stamp="$VENV/.installed-$hash"
    if [ -e "$stamp" ] && ! compiled_build_stale; then
        say "python packages: up to date (setup.cfg, setup.py, pyproject.toml unchanged)"
        return 0
    fi
    # The install compiles the hot modules with mypyc when gcc and Python's headers are there
    # (setup.py, blockspace/build.py): a minute or two; BLOCKSPACE_PURE=1 skips it.
    say "python packages: pip install -e '.[test]'"
    (cd "$REPO" && "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e '.[test]')
    rm -f "$VENV"/.installed-*
    touch "$stamp"
    say "python packages: installed"
}

# --- 3. kernel modules --------------------------------------------------------------------
load_modules() {
    if [ ! -e /dev/fuse ]; then
        say "kernel: /dev/fuse missing, loading the fuse module"
        as_root modprobe fuse 2>/dev/null || say "kernel: modprobe fuse failed (ignored)"
    fi
    if [ ! -e /dev/loop-control ]; then
        say "kernel: /dev/loop-control missing, loading the loop module"
        as_root modprobe loop 2>/dev/null || say "kernel: modprobe loop failed (ignored)"
    fi
}

install_apt_packages
install_python_packages
load_modules
say "done"
