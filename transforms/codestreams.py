"""Free text in the headers of compressed pixel data: the comment and application segments of
JPEG and JPEG-LS codestreams and the comments of JPEG 2000 (and HTJ2K) codestreams.

A codestream carries its own metadata beside the image: a JPEG comment (``COM``) is free text,
an ``APP1`` segment holds Exif or XMP (camera serial numbers, dates, GPS positions, free-text
descriptions), ``APP13`` Photoshop's IPTC captions. Files made by wrapping a camera's or a
scanner's JPEG as it is (``img2dcm`` does so) keep all of it, and the data set's
de-identification never sees it: PS3.15 Table E.1-1 lists attributes only. An anonymization
blanks the payload of those segments (zero bytes, same length: no offset, fragment length or
offset table changes, and decoders skip the segments as before).

Kept, because decoding or showing the colours needs them: ``APP0`` (JFIF), ``APP2`` (ICC
profile), ``APP8`` (JPEG-LS colour transforms, SPIFF) and ``APP14`` (Adobe's colour transform
flag). Only the headers are walked (up to the first scan, or the first tile-part's data): a
segment the standard also allows between scans, or one that runs on into the next fragment, is
left as it is. JPEG XL, JP2 boxes and video are not walked. Pure Python over bytes; nothing
here decodes an image.
"""

from __future__ import annotations

_ITEM = b"\xfe\xff\x00\xe0"  # an item of encapsulated pixel data (always little endian)
#: Application segments decoders need (JFIF, ICC profile, JPEG-LS/SPIFF, Adobe).
KEPT_APPLICATION_MARKERS = frozenset({0xE0, 0xE2, 0xE8, 0xEE})
_JPEG_COM = 0xFE
_J2K_COM, _J2K_SOT, _J2K_SOD = 0xFF64, 0xFF90, 0xFF93


def blanked_pixel_data(value: bytes | bytearray | memoryview) -> bytes | None:
    """The encapsulated PixelData ``value`` (its items, without the sequence delimiter) with
    the payload of every text segment in its codestreams' headers set to zero bytes, or None
    where it has none. Every item that starts a codestream is walked: the Basic Offset Table
    never does (its first offset is 0), and a file that leaves the table out starts with its
    first frame (found by a review); a fragment that starts no codestream continues one and
    is not walked."""
    data = memoryview(value).cast("B")  # slices are views, whatever ``value`` is
    ranges: list[tuple[int, int]] = []
    pos, size = 0, len(data)
    while pos + 8 <= size and data[pos:pos + 4] == _ITEM:
        start = pos + 8
        end = start + int.from_bytes(data[pos + 4:pos + 8], "little")
        if end > size:
            break
        if end - start >= 4:
            fragment = data[start:end]
            if fragment[0] == 0xFF and fragment[1] == 0xD8:
                _jpeg_text(fragment, start, ranges)
            elif fragment[:4] == b"\xff\x4f\xff\x51":
                _j2k_text(fragment, start, ranges)
        pos = end
    if not ranges:
        return None
    out = bytearray(data)
    for a, b in ranges:
        out[a:b] = bytes(b - a)
    return bytes(out)


def _jpeg_text(f: bytes | memoryview, base: int, ranges: list[tuple[int, int]]) -> None:
    """COM and APPn (but :data:`KEPT_APPLICATION_MARKERS`) payloads before the first scan."""
    pos, n = 2, len(f)
    while pos + 4 <= n:
        if f[pos] != 0xFF:
            return
        marker = f[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image: the header is over
            return
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        length = (f[pos + 2] << 8) | f[pos + 3]
        end = pos + 2 + length
        if length < 2 or end > n:
            return
        if (marker == _JPEG_COM or (0xE0 <= marker <= 0xEF and marker not in KEPT_APPLICATION_MARKERS)) \
                and end > pos + 4:
            ranges.append((base + pos + 4, base + end))
        pos = end


def _j2k_segments(f: bytes | memoryview, pos: int, stop: int, base: int,
                  ranges: list[tuple[int, int]]) -> int | None:
    """Walk marker segments from ``pos`` until SOT or SOD (returned: its offset), noting COM
    payloads (after their two-byte Rcom); None where the bytes are no marker segment."""
    while pos + 4 <= stop:
        marker = (f[pos] << 8) | f[pos + 1]
        if marker in (_J2K_SOT, _J2K_SOD):
            return pos
        if marker >> 8 != 0xFF:
            return None
        length = (f[pos + 2] << 8) | f[pos + 3]
        end = pos + 2 + length
        if length < 2 or end > stop:
            return None
        if marker == _J2K_COM and end > pos + 6:
            ranges.append((base + pos + 6, base + end))
        pos = end
    return None


def _j2k_text(f: bytes | memoryview, base: int, ranges: list[tuple[int, int]]) -> None:
    """COM payloads of the main header and of every tile-part header (ISO 15444-1 A.4)."""
    n = len(f)
    pos = _j2k_segments(f, 2, n, base, ranges)
    while pos is not None and pos + 12 <= n and f[pos] == 0xFF and f[pos + 1] == 0x90:
        psot = int.from_bytes(f[pos + 6:pos + 10], "big")  # this tile-part's length from SOT; 0: to EOC
        tile_end = pos + psot if psot else n
        if tile_end > n or (psot and psot < 14):
            return
        header = pos + 2 + ((f[pos + 2] << 8) | f[pos + 3])
        _j2k_segments(f, header, tile_end, base, ranges)
        if not psot:
            return
        pos = tile_end
