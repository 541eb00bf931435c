"""RLE Lossless decoding through pylibjpeg-rle's segment decoder (``transforms.rle_decoder``).

Every RLE file of pydicom's test data and of the shared samples decodes to exactly what
pydicom's own pure-Python decoder gives; a segment padded past the image (found in real files)
decodes without the Rust panic pylibjpeg-rle's frame decoder prints on stderr; damaged frames
are refused with what is wrong.
"""

from __future__ import annotations

import copy
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_decoder

from tests.conftest import SAMPLES
from transforms import rle_decoder
from transforms import transcode as tc
from transforms.errors import CannotTranscode

pytest.importorskip("rle", reason="the plugin decodes with pylibjpeg-rle (the codecs extra)")
from rle.utils import decode_segment  # noqa: E402

RLE = "1.2.840.10008.1.2.5"
# The RLE files pydicom installs with itself (others of its test data are downloaded on demand).
BUNDLED = [
    "MR_small_RLE.dcm", "SC_rgb_rle.dcm", "SC_rgb_rle_2frame.dcm", "SC_rgb_rle_16bit.dcm",
    "SC_rgb_rle_16bit_2frame.dcm", "SC_rgb_rle_32bit.dcm", "SC_rgb_rle_32bit_2frame.dcm",
    "rtdose_rle.dcm", "rtdose_rle_1frame.dcm",
]


def _rle_samples() -> list[Path]:
    found = []
    for path in sorted(SAMPLES.rglob("*.dcm")):
        try:
            meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        except Exception:  # noqa: BLE001 - the samples include damaged files on purpose
            continue
        if meta.get("TransferSyntaxUID") == RLE:
            found.append(path)
    return found


def _pydicom_decodes(ds: pydicom.Dataset) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about padding
        arr, _ = get_decoder(RLE).as_array(ds, raw=True, decoding_plugin="pydicom")
    return arr


def _ours(ds: pydicom.Dataset) -> np.ndarray:
    decoder = get_decoder(RLE)
    tc._add_rle_plugin(decoder)
    arr, _ = decoder.as_array(ds, raw=True, decoding_plugin=rle_decoder.PLUGIN)
    return arr


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_rle_files_decode_as_pydicom_decodes_them(name: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name))
    ours, theirs = _ours(ds), _pydicom_decodes(ds)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


def test_shared_rle_samples_decode_as_pydicom_decodes_them() -> None:
    if not SAMPLES.is_dir():
        pytest.skip("../shared/dicom-samples not present")
    paths = _rle_samples()
    assert len(paths) >= 4  # Rle.dcm, the two RLEPlanarConfiguration files, 1.2.840.10008.1.2.5.dcm
    for path in paths:
        ds = pydicom.dcmread(path)
        assert np.array_equal(_ours(ds), _pydicom_decodes(ds)), path.name


def _mr_small() -> tuple[pydicom.Dataset, bytes, int]:
    """MR_small_RLE.dcm (64 x 64, 16-bit: two segments), its frame and its second offset."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    [frame] = generate_frames(ds.PixelData, number_of_frames=1)
    count, first, second = struct.unpack("<3L", frame[:12])
    assert (count, first) == (2, 64)
    return ds, frame, second


def _with_frame(ds: pydicom.Dataset, frame: bytes) -> pydicom.Dataset:
    out = copy.deepcopy(ds)  # Dataset.copy() is shallow: setting PixelData would change ds
    out.PixelData = encapsulate([frame + b"\x80" * (len(frame) % 2)])  # 0x80: RLE's no-op
    return out


def _literal_runs(data: bytes) -> bytes:
    return b"".join(bytes([len(data[i:i + 128]) - 1]) + data[i:i + 128] for i in range(0, len(data), 128))


def test_a_run_past_the_image_decodes_without_a_panic(capfd: pytest.CaptureFixture[str]) -> None:
    """The last segment's last run repeats its byte once too often (the image's 4096 bytes,
    then one more, as in pydicom issue 1438's file): pylibjpeg-rle's frame decoder panics on
    it (Rust prints on stderr, then pyo3 raises PanicException); the segment decoder gives the
    image and the byte past it is dropped, as pydicom's decoder does."""
    source, frame, second = _mr_small()
    plane = bytes(decode_segment(frame[second:]))
    assert len(plane) == 4096
    segment = _literal_runs(plane[:4095]) + bytes([257 - 2]) + plane[4095:]  # repeat twice
    padded = _with_frame(source, frame[:second] + segment)
    out = tc.transcode_result(padded, "1.2.840.10008.1.2.1").dataset
    assert np.array_equal(out.pixel_array, source.pixel_array)
    assert "panicked" not in capfd.readouterr().err
    with pytest.raises(BaseException, match="index out of bounds") as panic:  # the frame decoder
        get_decoder(RLE).as_array(padded, raw=True, decoding_plugin="pylibjpeg")
    assert type(panic.value).__name__ == "PanicException"
    assert "panicked" in capfd.readouterr().err


def test_a_short_segment_is_refused_naming_it() -> None:
    source, frame, second = _mr_small()
    short = _with_frame(source, frame[:second] + b"\x01\x05\x06")  # a literal run of 2 bytes
    with pytest.raises(CannotTranscode) as refused:
        tc.transcode_result(short, "1.2.840.10008.1.2.1")
    assert str(refused.value) == (
        "cannot decode source transfer syntax 1.2.840.10008.1.2.5: rle-segments: RuntimeError "
        "raised; pydicom: RuntimeError raised"
    )
    with pytest.raises(RuntimeError, match="RLE segment 2 decodes to 2 bytes where the image has 4096 pixels"):
        _ours(short)


def test_an_empty_segment_is_refused_without_a_panic(capfd: pytest.CaptureFixture[str]) -> None:
    """A segment whose offset is the frame's end (or the next segment's): decode_segment(b"")
    panics in pylibjpeg-rle (Rust prints a backtrace on stderr); it is short, and said so."""
    source, frame, second = _mr_small()
    empty = _with_frame(source, frame[:second])  # segment 2 starts where the frame ends
    with pytest.raises(CannotTranscode, match="^cannot decode source transfer syntax 1.2.840.10008.1.2.5: "):
        tc.transcode_result(empty, "1.2.840.10008.1.2.1")
    with pytest.raises(RuntimeError, match="RLE segment 2 decodes to 0 bytes where the image has 4096 pixels"):
        _ours(empty)
    assert "panicked" not in capfd.readouterr().err


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (struct.pack("<16L", 3, 64, 64, 64, *[0] * 12), "the RLE header gives 3 segments where the image needs 2"),
        (struct.pack("<16L", 2, 64, 9999, *[0] * 13), "RLE segment 2 has an offset outside the frame"),
        (struct.pack("<16L", 2, 12, 64, *[0] * 13), "RLE segment 1 has an offset outside the frame"),
    ],
)
def test_a_damaged_header_is_refused_saying_what_is_wrong(header: bytes, message: str) -> None:
    source, frame, _ = _mr_small()
    damaged = _with_frame(source, header + frame[64:])
    with pytest.raises(RuntimeError, match=message):
        _ours(damaged)


def test_the_plugin_is_unavailable_for_other_syntaxes() -> None:
    assert rle_decoder.is_available(RLE)
    assert not rle_decoder.is_available("1.2.840.10008.1.2.4.90")
