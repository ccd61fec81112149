"""tools/passthrough_nbd.py, the Python NBD ceiling of `tools/bench --nbd`: it must really
serve its image (the figures mean nothing otherwise). qemu-io writes, flushes, zeroes and
reads back through it, and the bytes land in the image."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[2] / "tools" / "passthrough_nbd.py"
MiB = 1 << 20


def test_passthrough_nbd_serves_its_image(tmp_path: Path) -> None:
    qemu_io = shutil.which("qemu-io")
    if qemu_io is None:
        pytest.skip("qemu-io is not installed (apt-get install qemu-utils)")
    image, sock = tmp_path / "disk.img", tmp_path / "nbd.sock"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    server = subprocess.Popen([sys.executable, str(SERVER), str(image), str(sock)])
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert server.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "no socket"
            time.sleep(0.05)
        uri = f"nbd+unix:///anything?socket={sock}"
        commands = ["write -P 0x3c 1M 2M", "write -z 2M 4k", "flush", "read -P 0x3c 1M 1M",
                    "read -P 0 2M 4k", "read -P 0x3c 2052k 1020k", "aio_write -P 0x11 8M 4k",
                    "aio_write -P 0x22 9M 4k", "aio_flush", "read -P 0x22 9M 4k"]
        result = subprocess.run([qemu_io, "-f", "raw", uri,
                                 *[a for c in commands for a in ("-c", c)]],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Pattern verification failed" not in result.stdout
        data = image.read_bytes()
        assert data[1 * MiB : 2 * MiB] == b"\x3c" * MiB
        assert data[2 * MiB : 2 * MiB + 4096] == bytes(4096)
        assert data[8 * MiB : 8 * MiB + 4096] == b"\x11" * 4096
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert not sock.exists()  # removed on SIGTERM
