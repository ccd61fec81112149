"""Host side of the VM lab: fetch Debian's kernel, build a tiny initramfs, probe the
accelerator, and run one command in a throw-away VM.

The VM boots Debian's own kernel (from its apt package, unpacked into the cache directory,
never installed on the host) with a busybox initramfs. The initramfs mounts the host's root
read-only (virtiofs with the `cloud` kernel flavour, 9p with `generic`), puts a tmpfs overlay
on top, switches into it and runs the command, so the host's installed Blockspace and its
virtualenv are used as they are while nothing the guest does reaches the host's files.

Channels: the command's stdout+stderr go to a virtio console (/dev/hvc0 -> JOB/out, streamed
to our stdout while the VM runs), its exit status to a second one (/dev/hvc1 -> JOB/rc), the
kernel's console to a serial port (JOB/console.log, shown on failure). Everything lives in a
scratch job directory that is removed afterwards, also after a timeout (the VM is killed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE_ENV = "VMLAB_CACHE"
SCRATCH_ENV = "VMLAB_SCRATCH"
QEMU = "qemu-system-x86_64"
VIRTIOFSD_PATHS = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/bin/virtiofsd")
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")
DEFAULT_MEMORY_MB = 3072
DEFAULT_CPUS = 2
PROBE_TIMEOUT = 12.0  # a working KVM reaches our init in about a second
KVM_CPU_MODELS = ("host", "max", "qemu64")  # tried in this order by the probe

# Loaded by /init before switching root (order resolved with modules.dep at setup time).
BOOT_MODULES = {
    "common": ["virtio_pci", "virtio_console", "overlay", "loop", "fuse", "dm-mod"],
    "virtiofs": ["virtiofs"],
    "9p": ["9pnet_virtio", "9p"],
}
# Shipped in the initramfs and bind-mounted at /lib/modules/<release> in the guest, so
# `modprobe` and the kernel's own request_module find them on demand.
LAB_MODULES = [
    "dm-flakey", "dm-delay", "dm-log-writes", "dm-zero", "ext4", "xfs", "crc32c_generic",
    "nbd",  # the nbd-fstrim scenario (nbd-client)
    "crc32c-intel", "virtio_blk",
]

FLAVOURS = {
    # flavour: (meta package, shared-root transport)
    "cloud": ("linux-image-cloud-amd64", "virtiofs"),
    "generic": ("linux-image-amd64", "9p"),
}


class LabError(Exception):
    """A one-line, user-facing error of the lab."""


def say(message: str) -> None:
    print(f"vmlab: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# paths


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.geteuid() == 0:
        return Path("/var/cache/blockspace-vmlab")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blockspace-vmlab"


def scratch_root() -> Path:
    return Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir())


def find_virtiofsd() -> str | None:
    for path in VIRTIOFSD_PATHS:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("virtiofsd")


def default_flavour() -> str:
    return "cloud" if find_virtiofsd() else "generic"


@dataclasses.dataclass
class Kernel:
    """A kernel unpacked in the cache, with its initramfs."""

    flavour: str
    release: str  # uname -r of the guest, e.g. 6.1.0-56-cloud-amd64
    package: str  # Debian package name and version it came from
    directory: Path

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def transport(self) -> str:
        return FLAVOURS[self.flavour][1]

    def to_json(self) -> dict[str, str]:
        return {"flavour": self.flavour, "release": self.release, "package": self.package,
                "directory": str(self.directory)}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> Kernel:
        return cls(data["flavour"], data["release"], data["package"], Path(data["directory"]))


# --------------------------------------------------------------------------------------------
# setup: kernel package


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]


def _apt_versioned_package(meta: str) -> str:
    """linux-image-cloud-amd64 -> linux-image-6.1.0-56-cloud-amd64 (what it depends on)."""
    result = _run(["apt-cache", "depends", meta])
    for line in result.stdout.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if match:
            return match.group(1)
    raise LabError(f"apt-cache does not know {meta} (run apt-get update?)")


def _download(meta: str, workdir: Path) -> Path:
    def attempt() -> Path | None:
        try:
            package = _apt_versioned_package(meta)
        except LabError:
            return None
        result = _run(["apt-get", "download", "-q", package], cwd=workdir)
        debs = sorted(workdir.glob(f"{package}_*.deb"))
        if result.returncode == 0 and debs:
            return debs[-1]
        say(f"apt-get download {package} failed: {result.stderr.strip().splitlines()[-1:]}")
        return None

    deb = attempt()
    if deb is None:
        say("refreshing apt lists (apt-get update)")
        _run(["apt-get", "update", "-qq"])
        deb = attempt()
    if deb is None:
        raise LabError(f"could not download Debian's {meta} package with apt-get download")
    return deb


def _parse_modules_dep(moddir: Path) -> dict[str, tuple[str, list[str]]]:
    """module name (dashes as underscores) -> (relative path, relative paths it depends on)."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, deps = line.partition(":")
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        table[name] = (path, deps.split())
    return table


def _module_closure(table: dict[str, tuple[str, list[str]]], names: list[str]) -> list[str]:
    """Paths of `names` and their dependencies, dependencies first; built-ins are skipped."""
    by_path = {path: deps for path, deps in table.values()}
    order: list[str] = []

    def add(path: str) -> None:
        if path in order:
            return
        for dep in by_path.get(path, []):
            add(dep)
        order.append(path)

    for name in names:
        entry = table.get(name.replace("-", "_"))
        if entry is not None:
            add(entry[0])
    return order


SIG_MAGIC = b"~Module signature appended~\n"


def strip_module_signature(data: bytes) -> bytes:
    """Drop the appended signature: the guest kernel does not enforce signatures, and
    checking them (a SHA-256 of the whole module under TCG) costs seconds per boot."""
    if not data.endswith(SIG_MAGIC):
        return data
    info = data[-len(SIG_MAGIC) - 12 : -len(SIG_MAGIC)]
    (sig_len,) = struct.unpack(">I", info[8:12])
    end = len(data) - len(SIG_MAGIC) - 12 - sig_len
    return data[:end] if end > 0 else data


def _unpack_kernel(deb: Path, flavour: str, dest: Path, workdir: Path) -> Kernel:
    tree = workdir / "tree"
    result = _run(["dpkg-deb", "-x", str(deb), str(tree)])
    if result.returncode != 0:
        raise LabError(f"dpkg-deb -x {deb.name}: {result.stderr.strip()}")
    vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise LabError(f"{deb.name} has no /boot/vmlinuz-*")
    release = vmlinuz[-1].name.removeprefix("vmlinuz-")
    moddir = tree / "lib" / "modules" / release
    if not moddir.is_dir():
        raise LabError(f"{deb.name} has no /lib/modules/{release}")
    result = _run(["depmod", "-b", str(tree), release])
    if result.returncode != 0:
        raise LabError(f"depmod on the unpacked kernel failed: {result.stderr.strip()}")
    table = _parse_modules_dep(moddir)
    transport = FLAVOURS[flavour][1]
    boot = BOOT_MODULES["common"] + BOOT_MODULES[transport]
    missing = [m for m in boot if m.replace("-", "_") not in table
               and not _builtin(moddir, m)]
    if missing:
        raise LabError(f"kernel {release} lacks modules {missing} needed to boot the lab")
    boot_paths = _module_closure(table, boot)
    all_paths = _module_closure(table, boot + LAB_MODULES)
    staging = dest / "modules" / "lib" / "modules" / release
    staging.mkdir(parents=True)
    for rel in all_paths:
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(strip_module_signature((moddir / rel).read_bytes()))
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (moddir / name).exists():
            shutil.copy(moddir / name, staging / name)
    result = _run(["depmod", "-b", str(dest / "modules"), release])
    if result.returncode != 0:
        raise LabError(f"depmod on the lab's modules failed: {result.stderr.strip()}")
    (dest / "boot-modules").write_text("".join(f"{p}\n" for p in boot_paths))
    shutil.copy(vmlinuz[-1], dest / "vmlinuz")
    config = tree / "boot" / f"config-{release}"
    if config.exists():
        shutil.copy(config, dest / "config")
    present = sorted({Path(p).name.split(".ko")[0] for p in all_paths})
    absent = [m for m in LAB_MODULES if m.replace("-", "_") not in table
              and not _builtin(moddir, m)]
    (dest / "modules.json").write_text(json.dumps({"modules": present, "absent": absent}))
    return Kernel(flavour, release, deb.name.removesuffix(".deb"), dest)


def _builtin(moddir: Path, name: str) -> bool:
    builtin = moddir / "modules.builtin"
    if not builtin.exists():
        return False
    wanted = name.replace("-", "_")
    return any(Path(line).name.split(".ko")[0].replace("-", "_") == wanted
               for line in builtin.read_text().splitlines())


# --------------------------------------------------------------------------------------------
# setup: initramfs


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An uncompressed newc archive of (path, mode, data) entries; symlinks carry their
    target as data."""
    out = bytearray()
    ino = 1
    for path, mode, data in [*entries, ("TRAILER!!!", 0, b"")]:
        name = path.encode() + b"\0"
        nlink = 2 if (mode & 0o170000) == 0o040000 else 1
        fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields)
        out += name
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
        ino += 1
    return bytes(out)


INIT_SCRIPT = r"""#!/bin/busybox sh
# vmlab init: load modules, mount the host root read-only under a tmpfs overlay, run the job.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
arg() { sed -n "s/.*vmlab\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
while read -r m; do insmod "/lib/modules/$(uname -r)/$m" 2>/dev/null; done < /boot-modules
for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /dev/hvc1 ] && break; sleep 0.1; done
out=/dev/hvc0; rc=/dev/hvc1
fail() { echo "vmlab-init: $*" > $out; echo 125 > $rc; poweroff -f; }
if [ "$(arg probe)" = 1 ]; then echo VMLAB-PROBE-OK > $out; echo 0 > $rc; poweroff -f; fi
job=$(arg job)
case "$(arg fs)" in
  9p) mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=512000 hostroot /mnt/host ;;
  *)  mount -t virtiofs -o ro hostroot /mnt/host ;;
esac || fail "cannot mount the host root"
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw || fail "tmpfs"
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work \
  overlay /newroot || fail "cannot mount the overlay"
N=/newroot
mount -t proc proc $N/proc
mount -t sysfs sys $N/sys
mount -t devtmpfs dev $N/dev
mkdir -p $N/dev/pts $N/dev/shm
mount -t devpts devpts $N/dev/pts
mount -t tmpfs tmpfs $N/dev/shm
for d in tmp run var/tmp; do mkdir -p $N/$d; mount -t tmpfs -o mode=1777 tmpfs $N/$d; done
# A checkout under /tmp (a CI clone) must stay visible through the fresh tmpfs above.
keep=$(arg keep)
case "$keep" in
  /tmp/*|/run/*|/var/tmp/*) mkdir -p "$N$keep" && mount --bind "/mnt/host$keep" "$N$keep" ;;
esac
[ -d /sys/fs/fuse/connections ] && mount -t fusectl fusectl $N/sys/fs/fuse/connections
M=/lib/modules/$(uname -r)
mkdir -p $N$M && mount --bind $M $N$M
mkdir -p $N/run/vmlab
cp "/mnt/host$job/cmd" $N/run/vmlab/cmd || fail "no job script at $job/cmd"
hostname vmlab
echo "booted $(cut -d' ' -f1 /proc/uptime)" > $rc
chroot $N /bin/sh /run/vmlab/cmd > $out 2>&1 < /dev/null
echo $? > $rc
sync
poweroff -f
"""


def _busybox() -> Path:
    for path in BUSYBOX_PATHS:
        p = Path(path)
        if p.exists():
            data = p.read_bytes()
            if b"/lib64/ld-linux" in data[:4096] or b"ld-linux-x86-64" in data[:4096]:
                raise LabError(f"{path} is dynamically linked: apt-get install busybox-static")
            return p
    raise LabError("busybox not found: apt-get install busybox-static")


def build_initramfs(kernel: Kernel) -> None:
    entries: list[tuple[str, int, bytes]] = []
    for d in ["bin", "dev", "proc", "sys", "mnt", "mnt/host", "mnt/rw", "newroot", "lib",
              "lib/modules", "tmp"]:
        entries.append((d, 0o040755, b""))
    entries.append(("bin/busybox", 0o100755, _busybox().read_bytes()))
    entries.append(("bin/sh", 0o120777, b"busybox"))
    entries.append(("init", 0o100755, INIT_SCRIPT.encode()))
    entries.append(("boot-modules", 0o100644, (kernel.directory / "boot-modules").read_bytes()))
    base = kernel.directory / "modules"
    for root, dirs, files in os.walk(base):
        dirs.sort()
        for name in dirs:
            rel = os.path.relpath(os.path.join(root, name), base)
            entries.append((rel, 0o040755, b""))
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, base)
            entries.append((rel, 0o100644, Path(full).read_bytes()))
    tmp = kernel.initrd.with_suffix(".tmp")
    tmp.write_bytes(_cpio_newc(entries))
    tmp.replace(kernel.initrd)


def _current_file() -> Path:
    return cache_dir() / "current.json"


def load_kernel(flavour: str | None = None) -> Kernel | None:
    """The kernel set up for `flavour` (or the current one), if its files are there."""
    try:
        data = json.loads(_current_file().read_text())
    except (OSError, ValueError):
        return None
    entry = data.get(flavour or data.get("default", ""))
    if not entry:
        return None
    kernel = Kernel.from_json(entry)
    if not (kernel.vmlinuz.exists() and kernel.initrd.exists()):
        return None
    return kernel


def setup(flavour: str | None = None, *, force: bool = False) -> Kernel:
    if platform.machine() not in ("x86_64", "amd64"):
        raise LabError(f"the lab boots x86_64 kernels only (this is {platform.machine()})")
    flavour = flavour or default_flavour()
    if flavour == "cloud" and not find_virtiofsd():
        raise LabError("the cloud flavour needs virtiofsd (apt-get install qemu-system-common)")
    for tool in (QEMU, "apt-get", "dpkg-deb", "depmod"):
        if not shutil.which(tool):
            raise LabError(f"{tool} not found: apt-get install qemu-system-x86 kmod")
    existing = load_kernel(flavour)
    if existing is not None and not force:
        build_initramfs(existing)  # cheap; picks up changes of the init script
        say(f"kernel {existing.release} ({existing.package}) already set up in "
            f"{existing.directory}")
        return existing
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    meta = FLAVOURS[flavour][0]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="setup-", dir=root) as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # apt-get download drops privileges to _apt when it can
        say(f"downloading Debian's {meta} package (apt-get download)")
        deb = _download(meta, work)
        say(f"unpacking {deb.name}")
        staging = work / "kernel"
        staging.mkdir()
        kernel = _unpack_kernel(deb, flavour, staging, work)
        dest = root / kernel.release
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
        kernel.directory = dest
    build_initramfs(kernel)
    _write_current(flavour, kernel)
    say(f"kernel {kernel.release} and initramfs ready in {kernel.directory} "
        f"({time.monotonic() - started:.1f}s)")
    return kernel


def _write_current(flavour: str, kernel: Kernel) -> None:
    try:
        data = json.loads(_current_file().read_text())
    except (OSError, ValueError):
        data = {}
    data[flavour] = kernel.to_json()
    data.setdefault("default", flavour)
    tmp = _current_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(_current_file())


def require_kernel(flavour: str | None = None) -> Kernel:
    kernel = load_kernel(flavour)
    if kernel is None:
        raise LabError("the lab is not set up: run `tools/vmlab setup` first")
    return kernel


# --------------------------------------------------------------------------------------------
# accelerator


def _qemu_version() -> str:
    result = _run([QEMU, "--version"])
    return result.stdout.splitlines()[0] if result.stdout else "unknown"


def _cpu_virt_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return flags & {"vmx", "svm", "hypervisor"}


def probe_accelerator(kernel: Kernel, *, refresh: bool = False) -> dict[str, str]:
    """{'accel': 'kvm:CPU'|'tcg', 'reason': ...}: KVM only if a timed trial boot of this very
    kernel under -accel kvm reaches our init (`/dev/kvm` existing is no proof: a paravirtual
    KVM may run only specially built guests, and a stock kernel then hangs silently).
    Cached per host kernel, qemu and guest kernel."""
    key = f"{platform.release()}|{_qemu_version()}|{kernel.release}"
    cache = cache_dir() / "accel.json"
    if not refresh:
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return {"accel": data["accel"], "reason": data["reason"] + " (cached probe)"}
        except (OSError, ValueError, KeyError):
            pass
    flags = _cpu_virt_flags()
    flag_note = ("CPU flags: " + (" ".join(sorted(flags & {"vmx", "svm"})) or "no vmx/svm")
                 + (", running under a hypervisor" if "hypervisor" in flags else ""))
    if not os.path.exists("/dev/kvm"):
        result = {"accel": "tcg", "reason": f"no /dev/kvm; {flag_note}"}
    elif not os.access("/dev/kvm", os.R_OK | os.W_OK):
        result = {"accel": "tcg", "reason": f"/dev/kvm is not accessible; {flag_note}"}
    else:
        failures = []
        result = {}
        for cpu in KVM_CPU_MODELS:
            started = time.monotonic()
            trial = run_vm(kernel, None, accel=f"kvm:{cpu}", timeout=PROBE_TIMEOUT,
                           probe=True, stream=False)
            took = time.monotonic() - started
            if trial.rc == 0 and "VMLAB-PROBE-OK" in trial.output:
                result = {"accel": f"kvm:{cpu}", "reason": f"a trial boot under KVM "
                          f"(-cpu {cpu}) reached init in {took:.1f}s; {flag_note}"}
                break
            why = (f"no sign of life within {took:.0f}s" if trial.timed_out else
                   (trial.qemu_error.strip().splitlines() or ["qemu failed"])[-1][:160])
            failures.append(f"-cpu {cpu}: {why}")
        if not result:
            result = {"accel": "tcg", "reason": "/dev/kvm exists but trial boots under KVM "
                      f"failed ({'; '.join(failures)}); {flag_note}"}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, **result}))
    return result


# --------------------------------------------------------------------------------------------
# running a VM


@dataclasses.dataclass
class VMResult:
    rc: int
    output: str
    timed_out: bool
    seconds: float
    boot_seconds: float | None
    qemu_error: str
    console_tail: str
    accel: str


def _guest_script(argv: list[str], cwd: str, env: dict[str, str]) -> str:
    lines = ["#!/bin/sh"]
    for key, value in env.items():
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append(f"cd {shlex.quote(cwd)} 2>/dev/null || cd /")
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


def _default_env() -> dict[str, str]:
    repo = Path(__file__).resolve().parents[2]
    path = f"{repo}/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env = {"PATH": path, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb",
           "VMLAB_GUEST": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    return env


def _kill_group(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def run_vm(
    kernel: Kernel,
    argv: list[str] | None,
    *,
    accel: str = "tcg",
    timeout: float = 600.0,
    memory_mb: int = DEFAULT_MEMORY_MB,
    cpus: int = DEFAULT_CPUS,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    probe: bool = False,
    stream: bool = True,
    keep: bool = False,
) -> VMResult:
    """Boot, run `argv` (or only the accelerator probe), power off. Never raises for what
    the guest does; the job directory is removed afterwards unless `keep`."""
    job = Path(tempfile.mkdtemp(prefix="vmlab-", dir=scratch_root()))
    os.chmod(job, 0o755)
    qemu: subprocess.Popen[bytes] | None = None
    virtiofsd: subprocess.Popen[bytes] | None = None
    started = time.monotonic()
    timed_out = False
    output_parts: list[bytes] = []
    try:
        if argv is not None:
            script = _guest_script(argv, cwd or os.getcwd(), {**_default_env(), **(env or {})})
            (job / "cmd").write_text(script)
        out_path, rc_path, console_path = job / "out", job / "rc", job / "console.log"
        for path in (out_path, rc_path):
            path.touch()
        transport = kernel.transport
        append = [
            "console=ttyS0", "quiet", "panic=-1", "oops=panic", "mitigations=off",
            "tsc=reliable", "no_timer_check", "random.trust_cpu=on", "audit=0",
            f"vmlab.fs={transport}", f"vmlab.job={job}",
            f"vmlab.keep={Path(__file__).resolve().parents[2]}",
        ]
        if probe:
            append.append("vmlab.probe=1")
        append += os.environ.get("VMLAB_KERNEL_ARGS", "").split()
        cmd = [
            QEMU, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-m", f"{memory_mb}M", "-smp", str(cpus),
            "-kernel", str(kernel.vmlinuz), "-initrd", str(kernel.initrd),
            "-append", " ".join(append),
            "-serial", f"file:{console_path}",
            "-device", "virtio-serial-pci",
            "-chardev", f"file,id=out,path={out_path}",
            "-device", "virtconsole,chardev=out",
            "-chardev", f"file,id=rc,path={rc_path}",
            "-device", "virtconsole,chardev=rc",
        ]
        if accel.startswith("kvm"):
            cpu = accel.partition(":")[2] or "host"
            cmd += ["-accel", "kvm", "-cpu", cpu]
        else:
            cmd += ["-accel", "tcg,thread=multi"]
        if not probe:
            if transport == "virtiofs":
                daemon = find_virtiofsd()
                if daemon is None:
                    raise LabError("virtiofsd not found (apt-get install qemu-system-common)")
                sock = job / "virtiofs.sock"
                virtiofsd = subprocess.Popen(
                    [daemon, f"--socket-path={sock}", "-o", "source=/", "-o", "cache=always",
                     "-o", "sandbox=chroot", "-o", "log_level=err"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=open(job / "virtiofsd.log", "wb"),  # noqa: SIM115
                    start_new_session=True)
                deadline = time.monotonic() + 10
                while not sock.exists():
                    if virtiofsd.poll() is not None or time.monotonic() > deadline:
                        raise LabError("virtiofsd did not start: "
                                       + (job / "virtiofsd.log").read_text()[-500:])
                    time.sleep(0.02)
                cmd += [
                    "-chardev", f"socket,id=vfs,path={sock}",
                    "-device", "vhost-user-fs-pci,chardev=vfs,tag=hostroot",
                    "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
                    "-numa", "node,memdev=mem",
                ]
            else:
                cmd += ["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,"
                        "readonly=on,multidevs=remap"]
        qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        assert qemu.stdout is not None
        os.set_blocking(qemu.stdout.fileno(), False)
        qemu_messages = bytearray()
        with open(out_path, "rb") as follow:
            while True:
                chunk = follow.read()
                if chunk:
                    output_parts.append(chunk)
                    if stream:
                        sys.stdout.buffer.write(chunk)
                        sys.stdout.flush()
                try:
                    qemu_messages += qemu.stdout.read() or b""
                except (BlockingIOError, TypeError):
                    pass
                if qemu.poll() is not None:
                    rest = follow.read()
                    if rest:
                        output_parts.append(rest)
                        if stream:
                            sys.stdout.buffer.write(rest)
                            sys.stdout.flush()
                    break
                if time.monotonic() - started > timeout:
                    timed_out = True
                    _kill_group(qemu)
                    break
                time.sleep(0.05)
        try:
            qemu_messages += qemu.stdout.read() or b""
        except (BlockingIOError, TypeError, ValueError):
            pass
        rc_lines = rc_path.read_text(errors="replace").split()
        booted = None
        if len(rc_lines) >= 2 and rc_lines[0] == "booted":
            try:
                booted = float(rc_lines[1])
            except ValueError:
                pass
            rc_lines = rc_lines[2:]
        if timed_out:
            rc = 124
        elif rc_lines and rc_lines[-1].lstrip("-").isdigit():
            rc = int(rc_lines[-1])
        else:
            rc = 125  # the guest never reported a status: it crashed or qemu failed
        console = console_path.read_text(errors="replace") if console_path.exists() else ""
        console = re.sub(r"\x1b(\[[0-9;?]*[A-Za-z]|c)", "", console)  # SeaBIOS's escapes
        return VMResult(
            rc=rc,
            output=b"".join(output_parts).decode(errors="replace"),
            timed_out=timed_out,
            seconds=time.monotonic() - started,
            boot_seconds=booted,
            qemu_error=qemu_messages.decode(errors="replace"),
            console_tail="\n".join(console.splitlines()[-40:]),
            accel=accel,
        )
    finally:
        _kill_group(qemu)
        _kill_group(virtiofsd)
        if keep:
            say(f"job directory kept: {job}")
        else:
            shutil.rmtree(job, ignore_errors=True)

