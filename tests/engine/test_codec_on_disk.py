"""The erasure code on disk (issue 16 item 7): each parity volume records the backend and
parameters its parity is computed with; a pool whose backend is missing does not open (one
line naming what to install); known-answer self-tests of the erasure code and of the xxh3
block checksum run at start-up and fail hard.

pyeclib's two Reed-Solomon backends agree for one parity column (XOR) and differ for two,
so a parity-2 volume written where only liberasurecode's own backend loads, then opened
where ISA-L loads, used to compute the other code: wrong parity, wrong degraded reads.
"""

import functools
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import xxhash

import blockspace.pool.pool as pool_module
from blockspace.disks.devices import FileDevice
from blockspace.errors import FormatError
from blockspace.geometry import erasure
from blockspace.geometry.layouts import LayoutSpec
from blockspace.ondisk import checksums
from blockspace.ondisk.checksums import SelfTestFailed
from blockspace.ondisk.journal import decode_slot
from blockspace.ondisk.metadata import CodecInfo, decode_metadata, encode_metadata
from blockspace.pool.pool import Pool
from blockspace.repair.scrub import ScrubReport, scrub_slab
from blockspace.volume.volume import Volume

MiB = 1 << 20
DISKS = 4
DISK_SIZE = 16 * MiB
PARITY2 = LayoutSpec("parity", 2, parity=2, interleave=16384)
MIRROR = LayoutSpec("mirror", 1, copies=2, interleave=16384)
VOLUME_SIZE = 2 * MiB
ISA_L, LIBERASURECODE = erasure.EC_TYPES


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a new process would: no self-test passed, no code checked."""
    monkeypatch.setattr(pool_module, "_SELF_TESTED", set())
    monkeypatch.setattr(pool_module, "_CODECS_CHECKED", set())


@pytest.fixture
def paths(tmp_path: Path) -> list[Path]:
    out = []
    for i in range(DISKS):
        path = tmp_path / f"disk{i}.img"
        with open(path, "wb") as handle:
            handle.truncate(DISK_SIZE)
        out.append(path)
    return out


class Opened:
    def __init__(self, pool: Pool, devices: list[FileDevice]) -> None:
        self.pool = pool
        self.devices = devices

    def close(self) -> None:
        self.pool.close()
        for device in self.devices:
            device.close()


async def create(paths: Sequence[Path], specs: dict[str, LayoutSpec]) -> Opened:
    devices = [FileDevice(str(path)) for path in paths]
    try:
        pool = await Pool.create("codec", devices, media=["hdd"] * len(devices),
                                 slab_size=MiB, meta_slot_size=64 << 10)
        for name, spec in specs.items():
            await pool.create_volume(name, VOLUME_SIZE, spec, "fixed")
    except BaseException:
        for device in devices:
            device.close()
        raise
    return Opened(pool, devices)


async def reopen(paths: Sequence[Path]) -> Opened:
    devices = [FileDevice(str(path)) for path in paths]
    try:
        return Opened(await Pool.open(devices), devices)
    except BaseException:
        for device in devices:
            device.close()
        raise


def on_disk(path: Path, pool: Pool) -> list[CodecInfo | None]:
    """The codecs the newest metadata slot of one image records, read without the pool."""
    geometry = pool.disks[0].geometry
    best = None
    with open(path, "rb") as handle:
        for slot in (0, 1):
            handle.seek(geometry.meta_offset + slot * geometry.meta_slot_size)
            try:
                md = decode_slot(handle.read(geometry.meta_slot_size), pool.uuid)
            except FormatError:
                continue
            if best is None or md.generation > best.generation:
                best = md
    assert best is not None
    return [volume.codec for volume in best.volumes]


async def scrub_all(volume: Volume) -> ScrubReport:
    report = ScrubReport()
    for slab in sorted(volume.record.slabs):
        report.add(await scrub_slab(volume, slab, repair=False))
    return report


# ---- recorded per parity volume ---------------------------------------------------------


def test_a_parity_volume_records_its_code_and_a_mirror_none(paths: list[Path]) -> None:
    async def scenario() -> None:
        opened = await create(paths, {"p": PARITY2, "m": MIRROR})
        opened.close()
        opened = await reopen(paths)
        try:
            expected = CodecInfo("pyeclib", erasure.default_backend(2, 2), 2, 2, "headerless")
            assert on_disk(paths[0], opened.pool) == [expected, None]
            assert opened.pool.volume("p").codec == expected
        finally:
            opened.close()

    trio.run(scenario)


def test_a_volume_keeps_the_code_it_was_written_with_on_a_host_that_has_another(
    paths: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written where only liberasurecode's backend loads, read and scrubbed where ISA-L is
    the default: parity still verifies, and a read without two disks rebuilds the data."""
    data = random.Random(7).randbytes(VOLUME_SIZE)

    async def written_without_isa_l() -> None:
        with monkeypatch.context() as host:
            host.setattr(erasure, "EC_TYPES", (LIBERASURECODE,))
            opened = await create(paths, {"p": PARITY2})
            try:
                assert opened.pool.volume("p").ec_type == LIBERASURECODE
                volume = Volume(opened.pool, opened.pool.volume("p"))
                await volume.write(0, data)
                await volume.flush()
            finally:
                opened.close()

    async def read_with_isa_l() -> None:
        assert erasure.default_backend(2, 2) == ISA_L
        opened = await reopen(paths)
        try:
            assert opened.pool.volume("p").ec_type == LIBERASURECODE
            volume = Volume(opened.pool, opened.pool.volume("p"))
            report = await scrub_all(volume)
            assert (report.mismatches, report.checksum_errors) == (0, 0), report
            for disk_id in (0, 1):  # two disks gone: every read is rebuilt from parity
                opened.pool.disks[disk_id].device = None
            assert await volume.read(0, VOLUME_SIZE) == data
        finally:
            opened.close()

    trio.run(written_without_isa_l)
    trio.run(read_with_isa_l)


def test_a_volume_recorded_before_the_field_reads_as_the_default_and_gets_it_at_the_next_commit(
    paths: list[Path],
) -> None:
    async def scenario() -> None:
        opened = await create(paths, {"p": PARITY2})
        try:
            volume = Volume(opened.pool, opened.pool.volume("p"))
            data = random.Random(8).randbytes(VOLUME_SIZE)
            await volume.write(0, data)
            await volume.flush()
            # What a Blockspace from before the field wrote: the same map without "codec".
            md = opened.pool.metadata
            md.volumes[0].codec = None
            md.generation += 1
            image = encode_metadata(md, md.meta_slot_size)
            for device, disk in zip(opened.devices, opened.pool.disks.values(), strict=True):
                for slot in (0, 1):
                    device.write_sync(disk.geometry.meta_offset + slot * md.meta_slot_size, image)
                device.flush_sync()
        finally:
            opened.close()
        assert on_disk(paths[0], opened.pool) == [None]

        opened = await reopen(paths)
        try:
            default = CodecInfo("pyeclib", erasure.default_backend(2, 2), 2, 2, "headerless")
            assert opened.pool.volume("p").codec == default
            assert on_disk(paths[0], opened.pool) == [None]  # opening alone writes nothing
            volume = Volume(opened.pool, opened.pool.volume("p"))
            report = await scrub_all(volume)
            assert (report.mismatches, report.checksum_errors) == (0, 0), report
            assert await volume.read(0, VOLUME_SIZE) == data
            await opened.pool.commit()
            assert on_disk(paths[0], opened.pool) == [default]
        finally:
            opened.close()

    trio.run(scenario)


# ---- a missing backend ------------------------------------------------------------------


def without_backend(missing: str) -> type:
    """pyeclib as on a host where `missing` cannot be loaded."""
    real = erasure.ECDriver

    class Driver:
        def __new__(cls, **kwargs: Any) -> Any:
            if kwargs.get("ec_type") == missing:
                raise erasure_not_available()
            return real(**kwargs)

    return Driver


def erasure_not_available() -> Exception:
    from pyeclib.ec_iface import ECBackendNotAvailable

    return ECBackendNotAvailable("backend not available")


def test_opening_a_pool_whose_backend_is_missing_fails_with_what_to_install(
    paths: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        opened = await create(paths, {"p": PARITY2})
        assert opened.pool.volume("p").codec == CodecInfo("pyeclib", ISA_L, 2, 2, "headerless")
        opened.close()
        monkeypatch.setattr(erasure, "ECDriver", without_backend(ISA_L))
        pool_module._CODECS_CHECKED.clear()  # another host: nothing checked yet
        with pytest.raises(erasure.BackendMissing) as caught:
            await reopen(paths)
        message = str(caught.value)
        assert "\n" not in message
        assert "volume 'p'" in message
        assert "isa_l_rs_vand" in message
        assert "apt install libisal2" in message

    trio.run(scenario)


def test_a_code_this_blockspace_does_not_know_is_refused_by_name(paths: list[Path]) -> None:
    async def scenario() -> None:
        opened = await create(paths, {"p": PARITY2})
        try:
            record = opened.pool.volume("p")
            record.codec = CodecInfo("pyeclib", "flat_xor_hd", 2, 2, "headerless")
            with pytest.raises(erasure.BackendMissing, match="'flat_xor_hd' is not one"):
                opened.pool.record_codecs()
        finally:
            opened.close()

    trio.run(scenario)


# ---- the codec field in the metadata ----------------------------------------------------


@pytest.mark.parametrize(
    ("volume", "codec", "error"),
    [
        ("m", CodecInfo("pyeclib", ISA_L, 1, 1, "headerless"), "only a parity volume"),
        ("p", CodecInfo("pyeclib", ISA_L, 3, 2, "headerless"), "does not match its layout"),
        ("p", CodecInfo("pyeclib", ISA_L, 2, 1, "headerless"), "does not match its layout"),
        ("p", CodecInfo("pyeclib", "isa l\n", 2, 2, "headerless"), "ec_type is not a name"),
        ("p", CodecInfo("pyeclib", ISA_L, True, 2, "headerless"), "k is not an integer"),
        ("p", CodecInfo("", ISA_L, 2, 2, "headerless"), "library is not a name"),
    ],
)
def test_a_malformed_codec_record_is_rejected(
    paths: list[Path], volume: str, codec: CodecInfo, error: str
) -> None:
    async def scenario() -> None:
        opened = await create(paths, {"p": PARITY2, "m": MIRROR})
        try:
            md = opened.pool.metadata
            image = encode_metadata(md, md.meta_slot_size)
            assert [v.codec for v in decode_metadata(image).volumes] == \
                [v.codec for v in md.volumes]
            md.volume(volume).codec = codec
            with pytest.raises(ValueError, match=error):
                encode_metadata(md, md.meta_slot_size)
        finally:
            opened.close()

    trio.run(scenario)


# ---- known answers at start-up ----------------------------------------------------------


def gf_mul(a: int, b: int) -> int:
    """GF(2^8) with ISA-L's polynomial x^8 + x^4 + x^3 + x^2 + 1."""
    product = 0
    while b:
        if b & 1:
            product ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return product


def isa_l_parity(data: list[bytes], m: int) -> list[bytes]:
    """ISA-L's gf_gen_rs_matrix rows, computed here from scratch: parity row r has the
    coefficients (2^r)^j for data column j."""
    parity = []
    generator = 1
    for _ in range(m):
        coefficients = [1]
        for _ in range(len(data) - 1):
            coefficients.append(gf_mul(coefficients[-1], generator))
        generator = gf_mul(generator, 2)
        parity.append(bytes(
            functools.reduce(lambda x, y: x ^ y,
                             (gf_mul(c, column[i]) for c, column in zip(coefficients, data,
                                                                        strict=True)))
            for i in range(len(data[0]))
        ))
    return parity


def known_answers() -> Iterator[tuple[str, int, int, str]]:
    for ec_type, answers in erasure.KNOWN_ANSWERS.items():
        for (k, m), digest in answers.items():
            yield ec_type, k, m, digest


@pytest.mark.parametrize(("ec_type", "k", "m", "digest"), list(known_answers()))
def test_the_known_answers_are_the_codes_themselves(ec_type: str, k: int, m: int,
                                                    digest: str) -> None:
    """The table is not just what the code gave once: ISA-L's answers are recomputed from
    its matrix in plain Python, and every m=1 code is XOR."""
    data = erasure.kat_data(k)
    if ec_type == ISA_L:
        assert erasure.parity_digest(isa_l_parity(data, m)) == digest
    if m == 1:
        columns = zip(*data, strict=True)
        xor = bytes(functools.reduce(lambda x, y: x ^ y, column) for column in columns)
        assert erasure.parity_digest([xor]) == digest
    erasure.self_test(ec_type)  # and this host's backend gives them


def test_the_erasure_self_test_catches_a_backend_that_computes_another_code(
    paths: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend consistent with itself but computing another code (here liberasurecode's
    matrix behind ISA-L's name, as a mixed-up build would) passes every round trip; only
    the known answers see it, and the pool does not open."""
    real = erasure.ECDriver

    def impostor(**kwargs: Any) -> Any:
        return real(**{**kwargs, "ec_type": LIBERASURECODE})

    async def scenario() -> None:
        opened = await create(paths, {"p": PARITY2})
        opened.close()
        monkeypatch.setattr(erasure, "ECDriver", impostor)
        pool_module._SELF_TESTED.clear()
        pool_module._CODECS_CHECKED.clear()
        with pytest.raises(SelfTestFailed, match=r"isa_l_rs_vand k=3 m=2 computes parity"):
            await reopen(paths)

    trio.run(scenario)


def test_the_erasure_self_test_catches_a_backend_that_cannot_rebuild(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = erasure.ErasureCodec.reconstruct

    def wrong(self: erasure.ErasureCodec, available: Any, wanted: Sequence[int]) -> Any:
        result = real(self, available, wanted)
        return {i: bytes(len(fragment)) for i, fragment in result.items()}

    monkeypatch.setattr(erasure.ErasureCodec, "reconstruct", wrong)
    with pytest.raises(SelfTestFailed, match="reconstruction does not give the data back"):
        erasure.self_test(ISA_L)


def test_the_checksum_self_test_passes_and_catches_a_wrong_hash(
    paths: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    checksums.self_test()
    real = xxhash.xxh3_64_intdigest
    monkeypatch.setattr(xxhash, "xxh3_64_intdigest", lambda data: real(bytes(data) + b"!"))
    with pytest.raises(SelfTestFailed, match="checksum self-test failed: xxh3_64 of nothing"):
        checksums.self_test()

    async def start() -> None:
        await create(paths, {})

    with pytest.raises(SelfTestFailed):  # the pool's start-up runs it and fails hard
        trio.run(start)
    assert all(path.read_bytes()[:8] == bytes(8) for path in paths), "create wrote anyway"


def test_the_checksum_self_test_catches_entries_that_do_not_verify() -> None:
    with pytest.raises(SelfTestFailed, match="known-good blocks do not verify"):
        checksums.self_test(verify=lambda data, entries: [0])
