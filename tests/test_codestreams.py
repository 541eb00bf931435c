"""Free text in compressed pixel data (JPEG comments, Exif, JPEG 2000 comments) is blanked by
an anonymization: exact bytes, the same lengths, and the same decoded pixels.

Found by a review: a JPEG comment or an Exif block in the codestream (files that wrap a
camera's or scanner's JPEG as it is) reached the output unchanged, with no Transcode or with a
Transcode to the file's own syntax."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragments

from transforms import dicomio
from transforms.codestreams import blanked_pixel_data
from transforms.engine import apply
from transforms.identity import Key
from transforms.request import parse_anonymize, parse_modify

from .conftest import sample

KEY = Key.from_bytes(b"codestream-test-key-0123456789")
SECRET = b"DOE^JOHN 1962-04-01 MRN 12345678"
imagecodecs = pytest.importorskip("imagecodecs")


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", marker, len(payload) + 2) + payload


def _read(path: Path | str) -> Dataset:
    return dicomio.read_dataset(Path(path).read_bytes(), check_uids=False)


def _fragments(ds: Dataset) -> list[bytes]:
    """The pixel data's fragments (the items after the Basic Offset Table)."""
    return list(generate_fragments(bytes(ds.PixelData)))[1:]


def _with_fragments(ds: Dataset, fragments: list[bytes]) -> Dataset:
    """``ds`` (read from a file) with its pixel data re-encapsulated from ``fragments``."""
    copy = ds.copy()
    copy.PixelData = encapsulate(fragments)
    copy["PixelData"].VR = "OB"
    return dicomio.read_dataset(dicomio.write_dataset(copy), check_uids=False)


def _anonymized(ds: Dataset, body: dict | None = None) -> Dataset:
    before = dicomio.write_dataset(ds)
    out = apply(parse_anonymize(body or {}), ds, KEY)
    assert dicomio.write_dataset(ds) == before, "the input dataset was modified"
    return dicomio.read_dataset(dicomio.write_dataset(out), check_uids=False)


def _jpeg_with_text() -> tuple[Dataset, bytes]:
    """pydicom's JPEG baseline file with a comment, an Exif block and an IPTC block after its
    JFIF segment (a wrapped camera JPEG); returns the data set and the source codestream."""
    ds = _read(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    (frame,) = _fragments(ds)
    assert frame[:4] == b"\xff\xd8\xff\xe0"  # SOI, then JFIF
    jfif_end = 4 + int.from_bytes(frame[4:6], "big")
    text = (_segment(0xFFFE, b"COM " + SECRET) + _segment(0xFFE1, b"Exif\0\0" + SECRET)
            + _segment(0xFFED, b"Photoshop 3.0\0" + SECRET))
    return _with_fragments(ds, [frame[:jfif_end] + text + frame[jfif_end:]]), frame


def test_jpeg_comment_exif_and_iptc_are_blanked_and_the_image_is_the_same():
    source, plain = _jpeg_with_text()
    (frame,) = _fragments(source)
    result = _anonymized(source)
    (out,) = _fragments(result)
    assert SECRET in frame and SECRET not in out
    assert len(out) == len(frame)
    # every byte but the three payloads is the source's; the payloads are zeros
    jfif_end = 4 + int.from_bytes(frame[4:6], "big")
    pos, blanked = jfif_end, []
    for marker in (0xFFFE, 0xFFE1, 0xFFED):
        assert int.from_bytes(out[pos:pos + 2], "big") == marker
        length = int.from_bytes(out[pos + 2:pos + 4], "big")
        assert out[pos + 4:pos + 2 + length] == bytes(length - 2)
        blanked.append((pos + 4, pos + 2 + length))
        pos += 2 + length
    kept = [i for i in range(len(frame)) if not any(a <= i < b for a, b in blanked)]
    assert bytes(out[i] for i in kept) == bytes(frame[i] for i in kept)
    assert out[:jfif_end] == plain[:jfif_end]  # JFIF (APP0) kept
    assert np.array_equal(imagecodecs.jpeg8_decode(out), imagecodecs.jpeg8_decode(plain))


def test_jpeg_segments_needed_to_decode_are_kept():
    """APP0 (JFIF), APP2 (ICC profile), APP8 (JPEG-LS colour transforms, SPIFF), APP14
    (Adobe): the decoders read them."""
    ds = _read(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    (frame,) = _fragments(ds)
    kept = b"".join(_segment(m, b"needed " + SECRET) for m in (0xFFE2, 0xFFE8, 0xFFEE))
    source = _with_fragments(ds, [frame[:2] + kept + frame[2:]])
    assert bytes(source.PixelData) == bytes(_anonymized(source).PixelData)


def test_jpeg_2000_comment_in_the_main_and_a_tile_part_header_is_blanked():
    """pydicom's JPEG2000.dcm: Kakadu's comment in the main header; a second one put into the
    first tile-part header (its Psot grown to match)."""
    ds = _read(get_testdata_file("JPEG2000.dcm"))
    (frame,) = _fragments(ds)
    assert b"Kakadu-2.2" in frame
    sot = frame.index(b"\xff\x90")
    psot = int.from_bytes(frame[sot + 6:sot + 10], "big")
    com = _segment(0xFF64, b"\x00\x01" + SECRET)  # Rcom 1: Latin text
    grown = frame[:sot + 6] + (psot + len(com)).to_bytes(4, "big") + frame[sot + 10:sot + 12]
    frame2 = grown + com + frame[sot + 12:]
    source = _with_fragments(ds, [frame2])
    (out,) = _fragments(_anonymized(source))
    assert len(out) == len(frame2)
    assert b"Kakadu" not in out and SECRET not in out
    main = frame.index(b"\xff\x64")
    length = int.from_bytes(frame[main + 2:main + 4], "big")
    assert out[main:main + 6] == frame[main:main + 6]  # marker, length and Rcom stay
    assert out[main + 6:main + 2 + length] == bytes(length - 4)
    assert out[sot + 12:sot + 16] == com[:4] and out[sot + 16:sot + 12 + len(com)] == com[4:6] + bytes(len(SECRET))
    assert np.array_equal(imagecodecs.jpeg2k_decode(out), imagecodecs.jpeg2k_decode(frame))


def test_jpeg_ls_comment_is_blanked():
    """A JPEG-LS codestream (CharLS through imagecodecs) with a comment after its SOI."""
    image = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 7) % 4096
    stream = bytes(imagecodecs.jpegls_encode(image))
    ds = _read(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    for name, value in (("Rows", 64), ("Columns", 64), ("SamplesPerPixel", 1), ("BitsAllocated", 16),
                        ("BitsStored", 12), ("HighBit", 11), ("PhotometricInterpretation", "MONOCHROME2")):
        setattr(ds, name, value)
    del ds.PlanarConfiguration
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"
    source = _with_fragments(ds, [stream[:2] + _segment(0xFFFE, SECRET) + stream[2:]])
    (out,) = _fragments(_anonymized(source))
    assert out[2:6] == b"\xff\xfe" + (len(SECRET) + 2).to_bytes(2, "big") and SECRET not in out
    assert np.array_equal(imagecodecs.jpegls_decode(out), image)


def _items(*fragments: bytes) -> bytes:
    return b"".join(struct.pack("<HHL", 0xFFFE, 0xE000, len(f)) + f for f in fragments)


def test_every_frame_is_walked_and_continuations_are_not():
    source, _ = _jpeg_with_text()
    (frame,) = _fragments(source)
    cut = frame.index(b"\xff\xda") + 20 & ~1  # frame 1 in two fragments, cut in its scan
    looks_like_text = _segment(0xFFFE, SECRET)  # a COM without SOI: no header, not walked
    table = struct.pack("<2L", 0, 16 + cut + len(looks_like_text) + len(frame) - cut)  # offsets
    value = _items(table, frame[:cut], looks_like_text + frame[cut:], frame)
    assert value.count(SECRET) == 7
    blanked = blanked_pixel_data(value)
    assert blanked is not None and len(blanked) == len(value)
    assert blanked.count(SECRET) == 1
    assert blanked.startswith(_items(table)) and looks_like_text + frame[cut:] in blanked


def test_a_first_frame_without_an_offset_table_is_walked():
    """Found by a review: the first item was always taken for the Basic Offset Table, so a file
    that leaves it out (not conformant, but met) kept its first frame's comment."""
    source, _ = _jpeg_with_text()
    (frame,) = _fragments(source)
    blanked = blanked_pixel_data(_items(frame))
    assert blanked is not None and SECRET not in blanked and len(blanked) == len(frame) + 8


@pytest.mark.parametrize("damage", [
    lambda f: f[:len(f) // 3],                       # truncated inside the entropy data
    lambda f: f[:40],                                # truncated inside a segment
    lambda f: f[:6] + b"\xff\xff\xff" + f[9:],       # a length that runs past the end
    lambda f: f[:2] + b"\x00" * 10 + f[12:],         # no marker where one must be
    lambda f: b"\xff\xd8",                           # a bare SOI
    lambda f: b"\xff\x4f\xff\x51\x00\x02\xff\x90" + bytes(9),  # a JPEG 2000 start, then rubbish
])
def test_damaged_codestreams_are_no_error(damage):
    source, _ = _jpeg_with_text()
    (frame,) = _fragments(source)
    value = _items(b"", damage(frame))
    result = blanked_pixel_data(value)
    if result is not None:
        assert len(result) == len(value) and SECRET not in result
    assert blanked_pixel_data(value[:-3]) is None  # the item runs past the end: not walked
    assert blanked_pixel_data(b"\xfe\xff\x00\xe0\xff\xff\xff\xff") is None


@pytest.mark.parametrize("case,body,operation", [
    ("kept PixelData", {"Keep": ["PixelData"]}, parse_anonymize),
    ("modify", {"Replace": {"PatientName": "X"}}, parse_modify),
])
def test_text_is_kept_where_the_request_keeps_pixel_data(case, body, operation):
    source, _ = _jpeg_with_text()
    out = apply(operation(body), source, KEY)
    assert bytes(out.PixelData) == bytes(source.PixelData), case


def test_real_files_lose_only_their_comments():
    """Issue164.dcm: 87 frames, each with LEAD Technologies' comment; the decoded frames are
    the source's."""
    path = sample("Issue164.dcm")
    source = _read(path)
    frames = _fragments(source)
    out = _fragments(_anonymized(source))
    assert len(out) == len(frames) == 87
    assert sum(b"LEAD Technologies" in f for f in frames) == 87
    assert not any(b"LEAD Technologies" in f for f in out)
    assert [len(f) for f in out] == [len(f) for f in frames]
    for a, b in zip(frames[:3], out[:3]):
        assert np.array_equal(imagecodecs.jpeg8_decode(a), imagecodecs.jpeg8_decode(b))
