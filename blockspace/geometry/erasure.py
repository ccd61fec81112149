"""Reed-Solomon erasure coding through pyeclib, on headerless fragments.

pyeclib prefixes every fragment with an 80-byte header. Storing it would misalign the
columns on disk, so we store only the payload. The header depends only on the fragment
size and index (checksums are off), so a template captured once per size lets us hand
pyeclib well-formed fragments again when decoding.

RS over GF(2^8) is position-wise: byte i of a parity fragment depends only on byte i of
each data fragment. That is what lets the volume encode just the byte range of a row a
write touches.
"""

from collections.abc import Mapping, Sequence

from pyeclib.ec_iface import ECDriver

HEADER_SIZE = 80
_ALIGN = 64  # fragment payloads are padded to this; the padding is zeros and never stored
EC_TYPES = ("isa_l_rs_vand", "liberasurecode_rs_vand")
_MAX_TEMPLATES = 256


def _make_driver(k: int, m: int) -> tuple[ECDriver, str]:
    last_error: Exception | None = None
    for ec_type in EC_TYPES:
        try:
            return ECDriver(k=k, m=m, ec_type=ec_type), ec_type
        except Exception as error:  # pyeclib raises its own hierarchy, or ImportError-likes
            last_error = error
    raise RuntimeError(f"no Reed-Solomon backend available in pyeclib: {last_error}")


class ErasureCodec:
    """k data + m parity fragments of equal length, any length."""

    def __init__(self, k: int, m: int) -> None:
        if k < 1 or m < 1:
            raise ValueError(f"invalid erasure code k={k} m={m}")
        self.k = k
        self.m = m
        self.driver, self.ec_type = _make_driver(k, m)
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
        """Known-answer check at start-up: a broken codec must fail loudly, not corrupt data."""
        data = [bytes((i * 37 + j) % 251 for j in range(256)) for i in range(self.k)]
        parity = self.encode(data)
        available = {i: data[i] for i in range(self.m, self.k)}
        available.update({self.k + i: parity[i] for i in range(self.m)})
        rebuilt = self.reconstruct(available, list(range(self.m)))
        if any(rebuilt[i] != data[i] for i in range(self.m)):
            raise RuntimeError(f"erasure code self-test failed for {self.ec_type} k={self.k}")


def _padded_length(length: int) -> int:
    return max(_ALIGN, -(-length // _ALIGN) * _ALIGN)
