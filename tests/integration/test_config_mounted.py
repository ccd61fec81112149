"""The configuration file's [tier] and [metrics] keys take effect in a real daemon: the tier
optimizer runs at the configured period and rate, and `mount` without --metrics serves
the configured metrics address. `pool status` of the mixed-media pool shows what fits per
media class."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest

from integration.helpers import BlockspaceEnv, InProcessCLI, MiB, missing_prerequisites

MISSING = missing_prerequisites()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_tier_and_metrics_config_take_effect(
    blockspace_env: BlockspaceEnv, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = blockspace_env
    bs = InProcessCLI(env, capsys)
    port = free_port()
    config = env.root / "blockspace.toml"
    config.write_text(f'[tier]\noptimizer_period = 7\nrate = "5M"\n'
                      f'[metrics]\naddress = "127.0.0.1:{port}"\n')
    monkeypatch.setenv("BLOCKSPACE_CONFIG", str(config))  # the CLI and the daemon read it
    images = env.make_images([96 * MiB] * 4)
    bs.json("pool", "create", "tank", str(images[0]), str(images[1]), "--media", "ssd",
            "--slab-size", "8M")
    bs.json("disk", "add", "tank", *map(str, images[2:]), "--media", "hdd")
    bs.json("volume", "create", "tank", "fast", "--tier", "ssd:8M:mirror-2",
            "--tier", "hdd:32M:mirror-2", "--tier-unit", "256K")

    status = bs.json("pool", "status", "tank")
    by_media = status["usable_by_media"]
    assert set(by_media) == {"ssd", "hdd"}
    assert by_media["ssd"]["mirror-2"] is not None
    assert by_media["hdd"]["mirror-2"] is not None
    code, out, _ = bs("pool", "status", "tank")
    assert code == 0
    assert "fits (hdd)" in out
    assert "fits (ssd)" in out

    mountpoint, pid = bs.mount()
    try:
        optimizer = bs.json("tier", "status", "tank", "fast")[0]["optimizer"]
        assert (optimizer["interval"], optimizer["rate"]) == (7.0, 5 * MiB)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
            assert b"blockspace_" in reply.read()
    finally:
        bs.unmount(mountpoint, pid)


def test_a_bad_metrics_address_in_the_config_is_refused_before_mounting(
    blockspace_env: BlockspaceEnv, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = blockspace_env
    bs = InProcessCLI(env, capsys)
    config = Path(env.root / "blockspace.toml")
    config.write_text('[metrics]\naddress = "nowhere"\n')
    monkeypatch.setenv("BLOCKSPACE_CONFIG", str(config))
    images = env.make_images([96 * MiB])
    bs.json("pool", "create", "tank", str(images[0]), "--slab-size", "8M")
    (env.root / "mnt").mkdir()
    code, out, err = bs("mount", "tank", str(env.root / "mnt"))
    assert code == 2
    assert out == ""
    assert err.strip().endswith("metrics.address = 'nowhere': takes HOST:PORT, e.g. "
                                '"127.0.0.1:9469"'), err
    assert len(err.splitlines()) == 1
