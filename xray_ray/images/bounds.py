"""The hard bounds on any image we decode, and the one exception decoding raises.

Every limit lives in `DecodeLimits`; `LIMITS` holds the defaults that training, Serve and
scoring use. They are checked from the file system and the image header, before any pixel
buffer exists, so a hostile file costs at most a small multiple of an image at the cap:

- `max_file_bytes`: the file (a symlink's target counts) is refused before it is read;
- `max_side`, `min_side`, `max_aspect`: width and height from the header;
- `max_pixels`: width x height x frames;
- `max_bits`: bits per sample (a 64-bit DICOM is refused).

A refusal is an `ImageDecodeError` with a machine `code` (one of `CODES`) and a short
`reason` for people: codes are what reports count, reasons what they show.
"""

from __future__ import annotations

from dataclasses import dataclass

CODES = {
    "empty": "the file holds no bytes",
    "not_a_file": "a folder, named pipe, device or socket",
    "unreadable": "the file system refused it (missing, permission, symlink loop)",
    "file_too_large": "the file is larger than max_file_bytes",
    "changed_while_read": "the file changed while it was read",
    "not_an_image": "no supported format recognised in the content",
    "unsupported": "a recognised format with a feature we do not decode (colour or multi-frame DICOM, a codec)",
    "too_large": "width, height or width x height x frames above max_side / max_pixels",
    "too_small": "a side below min_side",
    "bad_aspect": "long side / short side above max_aspect",
    "bad_depth": "bits per sample above max_bits, or inconsistent",
    "truncated": "the data ends before the image does",
    "decode_failed": "the decoder rejected the data, or the data disagrees with its header",
    "out_of_memory": "the decoder ran out of memory",
}
"""Reason codes of `ImageDecodeError`, with what each means."""


class ImageDecodeError(ValueError):
    """Bytes or a path that cannot become an image: `code` (see CODES) and `reason` in a few words.

    A reason may name image attributes (size, photometric interpretation, transfer
    syntax) but never patient data, so it is safe to log or return to a client.
    """

    def __init__(self, reason: str, code: str = "decode_failed") -> None:
        super().__init__(reason, code)
        self.reason = reason
        self.code = code

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class DecodeLimits:
    """What a decodable image may be; the defaults fit any radiograph we know of with a wide margin.

    A detector plate is at most about 4,300 x 4,300 pixels at 16 bits, a stitched long-leg or
    spine image about 1:3; the caps are several times that.
    """

    max_side: int = 16_384
    max_pixels: int = 50_000_000
    min_side: int = 32
    max_aspect: float = 10.0
    max_bits: int = 32
    max_file_bytes: int = 256 * 2**20

    def check(self, width: int, height: int, frames: int = 1, bits: int = 8) -> None:
        """Raise ImageDecodeError unless a width x height (x frames) image of `bits` per sample is within bounds."""
        if max(width, height) > self.max_side:
            raise ImageDecodeError(f"too large ({width}x{height}, a side above {self.max_side} px)", "too_large")
        if width * height * max(frames, 1) > self.max_pixels:
            raise ImageDecodeError(f"too many pixels ({width}x{height}x{max(frames, 1)} = "
                                   f"{width * height * max(frames, 1)} > {self.max_pixels})", "too_large")
        if min(width, height) < self.min_side:
            raise ImageDecodeError(f"too small ({width}x{height} < {self.min_side} px)", "too_small")
        if max(width, height) > self.max_aspect * min(width, height):
            raise ImageDecodeError(f"extreme aspect ratio ({width}x{height}, more than {self.max_aspect:g}:1)",
                                   "bad_aspect")
        if not 1 <= bits <= self.max_bits:
            raise ImageDecodeError(f"unsupported bit depth ({bits} bits per sample, at most {self.max_bits})",
                                   "bad_depth")

    def memory_bound(self) -> int:
        """Bytes decoding one file may allocate at most, by construction: the file, a compressed copy
        of it, and a few working copies of an image at the cap (4 bytes a pixel each)."""
        return 2 * self.max_file_bytes + 16 * self.max_pixels


LIMITS = DecodeLimits()
"""The limits every job uses; change the defaults above to change them everywhere."""
