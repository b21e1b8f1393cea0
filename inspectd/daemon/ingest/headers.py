"""Refusing bad encoded frames before decoding: image dimensions read from the PNG IHDR, JPEG SOF, BMP, TIFF, PNM
(PGM/PPM/PBM) or WebP header, checked against max_pixels, and truncated files recognised by their missing trailer or
the length their header gives."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import cast

import numpy as np

from engines.data.images import (
    FORMATS,
    PNG_SIGNATURE,
    TIFF_MAGIC,
    as_uint8_gray_or_rgb,
    decode_image,
    decode_native,
)
from engines.errors import DataError

# How a frame's pixels travel: raw uint8 arrays, or an encoded image decoded here.
ENCODINGS = ("raw", "jpeg", "png")
# OpenCV's decoders raise on a side longer than this (CV_IO_MAX_IMAGE_WIDTH/HEIGHT), whatever max_pixels allows.
MAX_SIDE = 1 << 20
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8, CC are not frames.
JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# JPEG markers without a length: TEM, RST0-7, SOI, EOI.
JPEG_STANDALONE = {0x01, *range(0xD0, 0xDA)}
# Bytes of entropy-coded JPEG data searched for a marker at a time.
MARKER_WINDOW = 1 << 18
# PNM (netpbm) headers: P1-P6, then width, height and (but for bitmaps) maxval as decimal text, each after whitespace
# or comments. A header longer than this is no camera's.
PNM_HEADER_MAX = 4096
PNM_SPACE = b" \t\n\r\v\f"
# Per PNM kind: values per pixel, and whether the raster is text (P1-P3) or binary (P4-P6).
PNM_KINDS = {
    ord("1"): (1, True),
    ord("2"): (1, True),
    ord("3"): (3, True),
    ord("4"): (1, False),
    ord("5"): (1, False),
    ord("6"): (3, False),
}
_PNM_IS_SPACE = np.zeros(256, dtype=bool)
_PNM_IS_SPACE[list(PNM_SPACE)] = True


class _CutShort(Exception):
    """A known signature, but the data ends before the header says how large the image is (or holds only the zero
    bytes of a file whose writer set its size first: the message says so)."""


def encoded_dims(data: bytes | memoryview) -> tuple[str, int, int] | None:
    """(format, height, width) read from a PNG, JPEG, BMP, TIFF, PNM or WebP header without decoding anything; None if
    none (also when the data ends before the header)."""
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
    if len(view) >= 2 and view[0] == ord("P") and view[1] in PNM_KINDS:
        return _pnm_dims(view)
    if view[:4] == b"RIFF" and (len(view) < 12 or view[8:12] == b"WEBP"):
        return _webp_dims(view)
    return None


def _png_dims(view: memoryview) -> tuple[str, int, int] | None:
    if len(view) < 24:
        raise _CutShort
    if view[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", view[16:24])
    return "png", height, width


def _jpeg_dims(view: memoryview) -> tuple[str, int, int] | None:
    for marker, pos, _ in _jpeg_markers(view):
        if marker in JPEG_SOF:
            if pos + 9 > len(view):
                raise _CutShort
            height, width = struct.unpack(">HH", view[pos + 5 : pos + 9])
            return "jpeg", height, width
        if marker in (-1, 0xDA, 0xD9):  # bytes that are no marker, or a scan or the end before any frame header
            return None
    raise _CutShort  # not reached: the walk itself ends by raising it


def _jpeg_markers(view: memoryview) -> Iterator[tuple[int, int, int]]:
    """Each marker after SOI as (marker, its offset, the offset after its segment), in file order: a segment is
    passed by its length (an EXIF thumbnail's own SOI..EOI inside APP1 is never seen), and a scan's entropy-coded
    data by searching for the marker that ends it. Marker -1: the bytes at that offset are not a marker (the walk
    goes on from the next one). Raises _CutShort when the data ends first, so EOI (0xD9) is seen only in a file
    that is complete."""
    n, pos = len(view), 2
    pixels: np.ndarray | None = None
    while pos + 2 <= n:
        marker = view[pos + 1] if view[pos] == 0xFF else -1
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == -1 or marker in JPEG_STANDALONE:
            end = pos + 2
        elif pos + 4 > n:
            raise _CutShort
        else:
            end = pos + 2 + struct.unpack(">H", view[pos + 2 : pos + 4])[0]
        yield marker, pos, end
        if marker == -1 or marker == 0xDA:
            if pixels is None:
                pixels = np.frombuffer(view, dtype=np.uint8)
            pos = _next_marker(pixels, pos if marker == -1 else end)
        else:
            pos = end
    raise _CutShort  # the segments run on past the data (EXIF and ICC blocks can fill the first tens of KB)


def _next_marker(data: np.ndarray, pos: int) -> int:
    """Offset of the first marker at or after pos: 0xFF followed by a byte other than 0x00 (a stuffed 0xFF in
    entropy-coded data), 0xFF (fill) or RST0-7 (restart markers, which sit inside a scan). Searched a window at a
    time, so a scan costs a few vectorised passes over its own bytes, not a Python step per byte, and never a
    whole-file temporary."""
    n = len(data)
    while pos + 1 < n:
        stop = min(n, pos + MARKER_WINDOW + 1)
        window = data[pos:stop]
        ffs = np.flatnonzero(window[:-1] == 0xFF)
        if len(ffs):
            after = window[ffs + 1]
            hits = ffs[(after != 0x00) & (after != 0xFF) & ((after & 0xF8) != 0xD0)]
            if len(hits):
                return pos + int(hits[0])
        pos = stop - 1
    raise _CutShort


def _jpeg_complete(view: memoryview) -> bool:
    """Whether the marker walk reaches EOI: bytes after it (a camera's metadata, 0xFF padding) do not matter."""
    try:
        return any(marker == 0xD9 for marker, _, _ in _jpeg_markers(view))
    except _CutShort:
        return False


def _png_complete(view: memoryview) -> bool:
    """Whether the chunks, walked by their lengths, reach a whole IEND chunk: bytes after it do not matter."""
    n, pos = len(view), 8
    while pos + 8 <= n:
        if view[pos + 4 : pos + 8] == b"IEND":
            return pos + 12 <= n
        pos += 12 + struct.unpack(">I", view[pos : pos + 4])[0]
    return False


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
    if entries == 0:
        # A directory has at least one entry: zero bytes there are a file whose writer set its final size first
        # and has not written its directory yet (OpenCV and libtiff write it after the pixels).
        raise _CutShort("TIFF directory of zero bytes (not written yet)")
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


def _pnm_header(view: memoryview) -> tuple[int, int, int, int] | None:
    """(width, height, maxval, offset of the raster) of a PNM header (maxval 1 for a bitmap); None where the bytes
    after the magic are no such header."""
    n = min(len(view), PNM_HEADER_MAX)
    values: list[int] = []
    pos = 2
    for _ in range(2 if view[1] in (ord("1"), ord("4")) else 3):
        while True:  # whitespace and comments (# to the end of the line) before each value
            if pos >= n:
                raise _CutShort if n < PNM_HEADER_MAX else _NotPnm
            if view[pos] in PNM_SPACE:
                pos += 1
            elif view[pos] == ord("#"):
                while pos < n and view[pos] not in b"\r\n":
                    pos += 1
            else:
                break
        start = pos
        while pos < n and 0x30 <= view[pos] <= 0x39:
            pos += 1
        if pos == start or pos - start > 9:
            return None
        values.append(int(bytes(view[start:pos])))
    # One whitespace byte ends the header; at the end of the data, the last value may still go on.
    if pos >= len(view):
        raise _CutShort
    if view[pos] not in PNM_SPACE:
        return None
    width, height = values[0], values[1]
    maxval = values[2] if len(values) == 3 else 1
    if not 1 <= maxval <= 0xFFFF:
        return None
    return width, height, maxval, pos + 1


class _NotPnm(Exception):
    """More header than any PNM writer makes: not one."""


def _pnm_dims(view: memoryview) -> tuple[str, int, int] | None:
    try:
        header = _pnm_header(view)
    except _NotPnm:
        return None
    if header is None:
        return None
    return "pnm", header[1], header[0]


def _pnm_complete(view: memoryview) -> bool:
    """Whether the raster holds every value its header declares: a binary one's length is known (2 bytes a value
    where maxval is over 255); a text one is counted in values (P2/P3) or 0/1 digits (P1). Bytes after the raster do
    not matter. A text raster cut inside its last value is not told apart."""
    width, height, maxval, offset = cast(tuple[int, int, int, int], _pnm_header(view))
    channels, text = PNM_KINDS[view[1]]
    if not text:
        if view[1] == ord("4"):
            need = (width + 7) // 8 * height
        else:
            need = width * height * channels * (2 if maxval > 255 else 1)
        return len(view) - offset >= need
    raster = np.frombuffer(view, dtype=np.uint8)[offset:]
    if view[1] == ord("1"):
        found = int(np.count_nonzero((raster == 0x30) | (raster == 0x31)))
    else:
        spaces = _PNM_IS_SPACE[raster]
        found = int(np.count_nonzero(~spaces[1:] & spaces[:-1])) + int(len(raster) > 0 and not spaces[0])
    return found >= width * height * channels


def _webp_dims(view: memoryview) -> tuple[str, int, int] | None:
    """The canvas of a WebP: its first chunk, VP8 (lossy), VP8L (lossless) or VP8X (extended)."""
    if len(view) < 30:
        raise _CutShort
    chunk = bytes(view[12:16])
    if chunk == b"VP8 ":
        if view[23:26] != b"\x9d\x01\x2a":  # a key frame's start code
            return None
        width, height = struct.unpack("<HH", view[26:30])
        return "webp", height & 0x3FFF, width & 0x3FFF
    if chunk == b"VP8L":
        if view[20] != 0x2F:
            return None
        (bits,) = struct.unpack("<I", view[21:25])
        return "webp", ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(view[24:27], "little") + 1
        height = int.from_bytes(view[27:30], "little") + 1
        return "webp", height, width
    return None


def _webp_complete(view: memoryview) -> bool:
    """Whether the data holds the whole RIFF container its header gives the length of: bytes after it do not matter."""
    (size,) = struct.unpack("<I", view[4:8])
    return len(view) >= 8 + size + (size & 1)


def _bmp_size(view: memoryview) -> int:
    """The bytes a BMP needs: its header's file size, or, where a writer left that 0, the end of its pixel rows
    (uncompressed ones: a compressed BMP's size is not known before it is decoded), at least its headers'. A size
    the header gives is taken as it is."""
    (size, _, offset, header_size) = struct.unpack("<IIII", view[2:18])
    if size:
        return size
    headers = 26 if header_size == 12 else max(34, 14 + header_size)
    if len(view) < headers:
        return headers
    if header_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height, _, bits = struct.unpack("<HHHH", view[18:26])
        compression = 0
    else:
        width, height, _, bits, compression = struct.unpack("<iiHHI", view[18:34])
    if compression not in (0, 3, 6):  # BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS: rows of a fixed size
        return 0  # a compressed BMP's length is known only once decoded: not checked here
    return offset + (abs(width) * bits + 31) // 32 * 4 * abs(height)


def max_frame_bytes(max_pixels: int) -> int:
    """The most bytes one frame of at most max_pixels can take: raw RGB, or an encoded image up to twice that, plus
    room for a header. Larger input is refused before it is read."""
    return 6 * max_pixels + (64 << 10)


class IncompleteImage(DataError):
    """Empty or cut short: for a file, possibly one still being written."""


class HeaderUnwritten(IncompleteImage):
    """Zero bytes where any image's header would be: a file whose writer set its final size first and has written
    nothing yet, or a finished file that is no image (a raw dump). A folder tells them apart by whether the file
    still has a hole."""


def check_and_decode(
    data: bytes | memoryview, what: str, max_pixels: int, expected: str | None = None, bit_depth: int = 16
) -> np.ndarray:
    """Decode an encoded frame, refusing (DataError) empty, truncated, unknown-format and oversized ones first.

    `expected` ("jpeg", "png"): the format the sender declared; anything else is refused. `bit_depth`: the
    significant bits of 16-bit pixels (engines.data.images.narrow_to_uint8)."""
    if len(data) == 0:
        raise IncompleteImage(f"{what}: empty (0 bytes), expected an encoded {expected or FORMATS} image")
    try:
        dims = _dims(memoryview(data))
    except _CutShort as exc:
        raise IncompleteImage(
            f"{what}: {str(exc) or 'ends before its image header'}, expected a complete {expected or FORMATS} image"
        ) from None
    if dims is None:
        if not any(memoryview(data)[:8]):
            # No format starts so: a file whose writer set its final size first and has written nothing yet.
            raise HeaderUnwritten(
                f"{what}: zero bytes where its image header should be (not written yet?), expected a complete "
                f"{expected or FORMATS} image"
            )
        raise DataError(
            f"{what}: no image header found (JPEG SOF, PNG IHDR, BMP, TIFF, PNM or WebP), expected a complete "
            f"{expected or FORMATS} image"
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
    # Decoders fill a truncated image with grey and report success; the missing end (found by walking the file's own
    # structure, so trailing metadata or padding after it is no sign of truncation) is the reliable sign.
    if fmt == "jpeg" and not _jpeg_complete(memoryview(data)):
        raise IncompleteImage(f"{what}: truncated JPEG (no end-of-image marker), expected a complete file")
    if fmt == "png" and not _png_complete(memoryview(data)):
        raise IncompleteImage(f"{what}: truncated PNG (no IEND chunk), expected a complete file")
    if fmt == "bmp" and len(data) < _bmp_size(memoryview(data)):
        raise IncompleteImage(
            f"{what}: truncated BMP (shorter than its header's file size, or its pixel rows), expected a complete file"
        )
    if fmt == "pnm" and not _pnm_complete(memoryview(data)):
        raise IncompleteImage(
            f"{what}: truncated PNM (fewer pixel values than its header declares), expected a complete file"
        )
    if fmt == "webp" and not _webp_complete(memoryview(data)):
        raise IncompleteImage(f"{what}: truncated WebP (shorter than its RIFF size), expected a complete file")
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
