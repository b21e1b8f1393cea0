"""Refusing bad encoded frames before decoding: image dimensions read from the PNG IHDR, JPEG SOF, BMP or TIFF header,
checked against max_pixels, and truncated files recognised by their missing trailer."""

from __future__ import annotations

import struct

import numpy as np

from engines.data.images import PNG_SIGNATURE, TIFF_MAGIC, as_uint8_gray_or_rgb, decode_image, decode_native
from engines.errors import DataError

# How a frame's pixels travel: raw uint8 arrays, or an encoded image decoded here.
ENCODINGS = ("raw", "jpeg", "png")
PNG_IEND = b"IEND\xaeB`\x82"
# OpenCV's decoders raise on a side longer than this (CV_IO_MAX_IMAGE_WIDTH/HEIGHT), whatever max_pixels allows.
MAX_SIDE = 1 << 20
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8, CC are not frames.
JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class _CutShort(Exception):
    """A known signature, but the data ends before the header says how large the image is."""


def encoded_dims(data: bytes | memoryview) -> tuple[str, int, int] | None:
    """(format, height, width) read from a PNG, JPEG, BMP or TIFF header without decoding anything; None if none
    (also when the data ends before the header)."""
    try:
        return _dims(memoryview(data))
    except _CutShort:
        return None


def _dims(view: memoryview) -> tuple[str, int, int] | None:
    if view[:8] == PNG_SIGNATURE:
        return _png_dims(view)
    if view[:2] == b"\xff\xd8":
        return _jpeg_dims(view)
    if view[:2] == b"BM":
        return _bmp_dims(view)
    if view[:4] in TIFF_MAGIC:
        return _tiff_dims(view)
    return None


def _png_dims(view: memoryview) -> tuple[str, int, int] | None:
    if len(view) < 24:
        raise _CutShort
    if view[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", view[16:24])
    return "png", height, width


def _jpeg_dims(view: memoryview) -> tuple[str, int, int] | None:
    pos = 2
    while pos + 4 <= len(view):
        if view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers carry no length
            pos += 2
            continue
        (length,) = struct.unpack(">H", view[pos + 2 : pos + 4])
        if marker in JPEG_SOF:
            if pos + 9 > len(view):
                raise _CutShort
            height, width = struct.unpack(">HH", view[pos + 5 : pos + 9])
            return "jpeg", height, width
        if marker == 0xDA:  # start of scan before any frame header: there is none
            return None
        pos += 2 + length
    raise _CutShort  # the segments run on past the data (EXIF and ICC blocks can fill the first tens of KB)


def _bmp_dims(view: memoryview) -> tuple[str, int, int] | None:
    if len(view) < 26:
        raise _CutShort
    (header_size,) = struct.unpack("<I", view[14:18])
    if header_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack("<HH", view[18:22])
    else:
        width, height = struct.unpack("<ii", view[18:26])
    return "bmp", abs(height), abs(width)  # negative height: rows stored top-down


def _tiff_dims(view: memoryview) -> tuple[str, int, int] | None:
    """Width and length tags of the first image file directory."""
    if len(view) < 8:
        raise _CutShort
    order = "<" if view[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", view[4:8])
    if ifd + 2 > len(view):
        raise _CutShort  # writers often put the directory after the pixels
    (entries,) = struct.unpack(order + "H", view[ifd : ifd + 2])
    dims: dict[int, int] = {}
    for i in range(entries):
        at = ifd + 2 + 12 * i
        if at + 12 > len(view):
            raise _CutShort
        tag, kind = struct.unpack(order + "HH", view[at : at + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            fmt, size = ("H", 2) if kind == 3 else ("I", 4)
            (dims[tag],) = struct.unpack(order + fmt, view[at + 8 : at + 8 + size])
    if 256 not in dims or 257 not in dims:
        return None
    return "tiff", dims[257], dims[256]


def max_frame_bytes(max_pixels: int) -> int:
    """The most bytes one frame of at most max_pixels can take: raw RGB, or an encoded image up to twice that, plus
    room for a header. Larger input is refused before it is read."""
    return 6 * max_pixels + (64 << 10)


class IncompleteImage(DataError):
    """Empty or cut short: for a file, possibly one still being written."""


def check_and_decode(
    data: bytes | memoryview, what: str, max_pixels: int, expected: str | None = None, bit_depth: int = 16
) -> np.ndarray:
    """Decode an encoded frame, refusing (DataError) empty, truncated, unknown-format and oversized ones first.

    `expected` ("jpeg", "png"): the format the sender declared; anything else is refused. `bit_depth`: the
    significant bits of 16-bit pixels (engines.data.images.narrow_to_uint8)."""
    if len(data) == 0:
        raise IncompleteImage(f"{what}: empty (0 bytes), expected an encoded {expected or 'JPEG/PNG/BMP/TIFF'} image")
    try:
        dims = _dims(memoryview(data))
    except _CutShort:
        raise IncompleteImage(
            f"{what}: ends before its image header, expected a complete {expected or 'JPEG/PNG/BMP/TIFF'} image"
        ) from None
    if dims is None:
        raise DataError(
            f"{what}: no image header found (JPEG SOF, PNG IHDR, BMP or TIFF), expected a complete "
            f"{expected or 'JPEG/PNG/BMP/TIFF'} image"
        )
    fmt, height, width = dims
    if expected is not None and fmt != expected:
        raise DataError(f"{what}: payload is {fmt}, expected {expected} as the header's encoding says")
    if height * width > max_pixels:
        raise DataError(
            f"{what}: {fmt} header declares {width}x{height} = {width * height} pixels, "
            f"expected at most max_pixels={max_pixels}"
        )
    if height == 0 or width == 0:
        raise DataError(f"{what}: {fmt} header declares {width}x{height}, expected a non-empty image")
    if max(height, width) > MAX_SIDE:
        raise DataError(f"{what}: {fmt} header declares {width}x{height}, expected at most {MAX_SIDE} pixels a side")
    # Decoders fill a truncated image with grey and report success; the missing trailer is the reliable sign.
    tail = bytes(memoryview(data)[-16:]).rstrip(b"\0")
    if fmt == "jpeg" and not tail.endswith(b"\xff\xd9"):
        raise IncompleteImage(f"{what}: truncated JPEG (no end-of-image marker), expected a complete file")
    if fmt == "png" and not tail.endswith(PNG_IEND):
        raise IncompleteImage(f"{what}: truncated PNG (no IEND chunk), expected a complete file")
    if fmt == "bmp" and len(data) < struct.unpack("<I", memoryview(data)[2:6])[0]:
        raise IncompleteImage(f"{what}: truncated BMP (shorter than its header's file size), expected a complete file")
    if fmt == "tiff":
        # No trailer to look for, and the strips can lie anywhere: a TIFF that does not decode may be one still
        # being written (a folder gives it time), else it is broken. A TIFF that decodes to pixels of a kind frames
        # cannot have (float, two channels) is complete: refused at once, not given that time.
        try:
            native = decode_native(np.frombuffer(data, dtype=np.uint8), what=what)
        except DataError as exc:
            raise IncompleteImage(f"{exc} (or cut short)") from None
        return as_uint8_gray_or_rgb(native, what, bit_depth)
    return decode_image(np.frombuffer(data, dtype=np.uint8), what=what, bit_depth=bit_depth)
