"""Hostile uploads for Serve, written without ever holding their pixels: PNGs of any size that compress to
almost nothing, optionally padded to an exact body size with an ancillary chunk decoders skip."""

from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def black_png(width: int, height: int, bit_depth: int = 8, size: int | None = None) -> bytes:
    """A grayscale PNG of `width` x `height` zeros (8 or 16 bits), `size` bytes long when given."""
    row = b"\0" * (1 + width * bit_depth // 8)  # filter byte 0, then the samples
    packer = zlib.compressobj(9)
    compressed = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0))
    body = PNG_SIGNATURE + header + _chunk(b"IDAT", compressed)
    end = _chunk(b"IEND", b"")
    if size is not None:
        padding = size - len(body) - len(end) - 12  # a chunk adds length, type and CRC
        if padding < 0:
            raise ValueError(f"a {width}x{height} PNG needs more than {size} bytes")
        body += _chunk(b"pAdD", b"\0" * padding)  # ancillary, private, safe to copy: every decoder skips it
    return body + end
