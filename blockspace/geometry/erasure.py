"""Reed-Solomon erasure coding through pyeclib, on headerless fragments.

pyeclib prefixes every fragment with an 80-byte header. Storing it would misalign the
columns on disk, so we store only the payload. The header depends only on the fragment
size and index (checksums are off), so a template captured once per size lets us hand
pyeclib well-formed fragments again when decoding.

RS over GF(2^8) is position-wise: byte i of a parity fragment depends only on byte i of
each data fragment. That is what lets the volume encode just the byte range of a row a
write touches.
"""

import hashlib
from collections.abc import Mapping, Sequence

from pyeclib.ec_iface import ECDriver

from blockspace.errors import BlockspaceError
from blockspace.ondisk.checksums import SelfTestFailed

HEADER_SIZE = 80
_ALIGN = 64  # fragment payloads are padded to this; the padding is zeros and never stored
# The backends, in the order a new parity volume takes them. They agree for m=1 (XOR) but
# not for m=2, so each parity volume records the one its parity was computed with.
EC_TYPES = ("isa_l_rs_vand", "liberasurecode_rs_vand")
LIBRARY = "pyeclib"
# How fragments are stored: pyeclib's payload only (its 80-byte header is rebuilt from a
# template), of the column's own length (the padding to 64 bytes exists in memory only).
FRAGMENT_FORMAT = "headerless"
# What provides each backend, for the one line an open without it fails with.
INSTALL = {
    "isa_l_rs_vand": "ISA-L (Debian/Ubuntu: apt install libisal2)",
    "liberasurecode_rs_vand": "liberasurecode's own Reed-Solomon (Debian/Ubuntu: "
                              "apt install liberasurecode1)",
}
_MAX_TEMPLATES = 256


class BackendMissing(BlockspaceError):
    """The erasure backend a volume's parity was computed with cannot be loaded here."""


def _make_driver(k: int, m: int, ec_type: str | None) -> tuple[ECDriver, str]:
    if ec_type is not None:
        return _driver(k, m, ec_type), ec_type
    last_error: Exception | None = None
    for candidate in EC_TYPES:
        try:
            return ECDriver(k=k, m=m, ec_type=candidate), candidate
        except Exception as error:  # pyeclib raises its own hierarchy, or ImportError-likes
            last_error = error
    raise BackendMissing(
        f"no Reed-Solomon backend of pyeclib loads ({str(last_error)[:80]}): install "
        f"{INSTALL[EC_TYPES[0]]}"
    )


def _driver(k: int, m: int, ec_type: str) -> ECDriver:
    if ec_type not in EC_TYPES:
        raise BackendMissing(
            f"erasure backend {ec_type!r:.40} is not one this Blockspace knows "
            f"({', '.join(EC_TYPES)}): open the pool with the version that created it"
        )
    try:
        return ECDriver(k=k, m=m, ec_type=ec_type)
    except Exception as error:  # pyeclib's ECBackendNotAvailable and kin
        raise BackendMissing(
            f"erasure backend {ec_type} (k={k}, m={m}) is not available here "
            f"({type(error).__name__}): install {INSTALL[ec_type]}"
        ) from None


def default_backend(k: int, m: int) -> str:
    """The backend a new parity volume gets on this host: the first of EC_TYPES that loads."""
    return _make_driver(k, m, None)[1]


def check_backend(library: str, ec_type: str, k: int, m: int, fragments: str) -> None:
    """BackendMissing unless this host can compute exactly this code the way it is stored
    (one line, naming what to install). Its known answers are `self_test`'s."""
    if library != LIBRARY or fragments != FRAGMENT_FORMAT:
        raise BackendMissing(
            f"erasure code {library!r:.40} with {fragments!r:.40} fragments is not one this "
            f"Blockspace knows ({LIBRARY}, {FRAGMENT_FORMAT})"
        )
    _driver(k, m, ec_type)


class ErasureCodec:
    """k data + m parity fragments of equal length, any length. `ec_type`: the backend the
    volume recorded (None: this host's default, for a new volume)."""

    def __init__(self, k: int, m: int, ec_type: str | None = None) -> None:
        if k < 1 or m < 1:
            raise ValueError(f"invalid erasure code k={k} m={m}")
        self.k = k
        self.m = m
        self.driver, self.ec_type = _make_driver(k, m, ec_type)
        self._templates: dict[int, list[bytes]] = {}
        self._self_test()

    def encode(self, data: Sequence[bytes | bytearray | memoryview]) -> list[bytes]:
        """k equal-length data fragments -> m parity fragments of the same length."""
        if len(data) != self.k:
            raise ValueError(f"expected {self.k} data fragments, got {len(data)}")
        length = len(data[0])
        if any(len(fragment) != length for fragment in data):
            raise ValueError("data fragments differ in length")
        padded = _padded_length(length)
        pad = bytes(padded - length)
        joined = b"".join(bytes(fragment) + pad for fragment in data)
        fragments = self.driver.encode(joined)
        parity = fragments[self.k :]
        return [bytes(fragment[HEADER_SIZE : HEADER_SIZE + length]) for fragment in parity]

    def reconstruct(
        self, available: Mapping[int, bytes | bytearray | memoryview], wanted: Sequence[int]
    ) -> dict[int, bytes]:
        """Rebuild fragments `wanted` (code indices: 0..k-1 data, k..k+m-1 parity) from at
        least k `available` ones."""
        if len(available) < self.k:
            raise ValueError(f"need {self.k} fragments to reconstruct, have {len(available)}")
        lengths = {len(fragment) for fragment in available.values()}
        if len(lengths) != 1:
            raise ValueError("fragments differ in length")
        length = lengths.pop()
        padded = _padded_length(length)
        pad = bytes(padded - length)
        headers = self._headers(padded)
        chosen = sorted(available)[: self.k]
        framed = [headers[i] + bytes(available[i]) + pad for i in chosen]
        missing = [i for i in wanted if i not in available]
        result = {i: bytes(available[i]) for i in wanted if i in available}
        if missing:
            rebuilt = self.driver.reconstruct(framed, missing)
            for index, fragment in zip(missing, rebuilt, strict=True):
                result[index] = bytes(fragment[HEADER_SIZE : HEADER_SIZE + length])
        return result

    def _headers(self, padded: int) -> list[bytes]:
        headers = self._templates.get(padded)
        if headers is None:
            if len(self._templates) >= _MAX_TEMPLATES:
                self._templates.clear()
            fragments = self.driver.encode(bytes(self.k * padded))
            headers = [bytes(fragment[:HEADER_SIZE]) for fragment in fragments]
            self._templates[padded] = headers
        return headers

    def _self_test(self) -> None:
        """Round trip at start-up with this very k and m (the known answers are in
        `self_test`): a broken codec must fail loudly, not corrupt data."""
        data = [bytes((i * 37 + j) % 251 for j in range(256)) for i in range(self.k)]
        parity = self.encode(data)
        available = {i: data[i] for i in range(self.m, self.k)}
        available.update({self.k + i: parity[i] for i in range(self.m)})
        rebuilt = self.reconstruct(available, list(range(self.m)))
        if any(rebuilt[i] != data[i] for i in range(self.m)):
            raise SelfTestFailed(
                f"erasure code self-test failed for {self.ec_type} k={self.k} m={self.m}: "
                "reconstruction does not give the data back"
            )


def _padded_length(length: int) -> int:
    return max(_ALIGN, -(-length // _ALIGN) * _ALIGN)


# ---- known answers --------------------------------------------------------------------------

# sha256 of the m parity fragments (joined) of `kat_data(k)`, per backend and (k, m). For
# isa_l_rs_vand these equal an independent GF(2^8) computation of its Vandermonde rows
# (tests/engine/test_codec_on_disk.py); parity 0 of every m=1 code is the XOR of the data.
KNOWN_ANSWERS: dict[str, dict[tuple[int, int], str]] = {
    "isa_l_rs_vand": {
        (2, 1): "6b8f9d2913970c392f4834f9b1e3f389",
        (3, 2): "495f4917dea333177cf4a38bf0cfc86d",
        (5, 2): "7237f58c021be4bb5423b33e7033654b",
    },
    "liberasurecode_rs_vand": {
        (2, 1): "6b8f9d2913970c392f4834f9b1e3f389",
        (3, 2): "2e14abfe7201a07db2ba57b5d9083dbb",
        (5, 2): "e13e64bf21fdce38f02c530361769254",
    },
}
KAT_LENGTH = 96  # not a multiple of the 64-byte alignment: the padding path is tested too


def kat_data(k: int) -> list[bytes]:
    return [bytes((i * 37 + j * 11 + 5) % 256 for j in range(KAT_LENGTH)) for i in range(k)]


def parity_digest(parity: Sequence[bytes]) -> str:
    return hashlib.sha256(b"".join(parity)).hexdigest()[:32]


def self_test(ec_type: str) -> None:
    """Known-answer test of one backend through this module's own framing: encode fixed
    data and compare the parity with the recorded answers, then rebuild every data fragment
    from the rest. SelfTestFailed (one line) on any difference; BackendMissing if the
    backend does not load."""
    for (k, m), expected in KNOWN_ANSWERS[ec_type].items():
        codec = ErasureCodec(k, m, ec_type)
        data = kat_data(k)
        parity = codec.encode(data)
        got = parity_digest(parity)
        if got != expected:
            raise SelfTestFailed(
                f"erasure code self-test failed: {ec_type} k={k} m={m} computes parity "
                f"{got[:16]}, not the known {expected[:16]} (a broken pyeclib or backend "
                "build?): refusing to serve parity volumes"
            )
        for lost in range(k):
            available: dict[int, bytes] = {i: data[i] for i in range(k) if i != lost}
            available[k] = parity[0]
            if codec.reconstruct(available, [lost])[lost] != data[lost]:
                raise SelfTestFailed(
                    f"erasure code self-test failed: {ec_type} k={k} m={m} does not rebuild "
                    f"data fragment {lost}: refusing to serve parity volumes"
                )
