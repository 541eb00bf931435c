"""Transcode: the round-trip matrix (every target x representative inputs) and its edge cases.

Every successful transcode is written to bytes, read back and decoded; lossless targets must give
exactly the source pixels, lossy ones the same shape, a small error and the Lossy* attributes.
Refusals are exact: each (input, target) pair that must fail is listed with the reason.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.processing import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.conftest import sample
from transforms import transcode as tc
from transforms.errors import CannotTranscode, RequestError

# pydicom's own test files carry a few out-of-spec values (long SH, bad UI); not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Invalid value for VR UI", "ignore:The value length .* exceeds the maximum length"
)

TARGETS = list(tc.SUPPORTED)
LOSSLESS = [t for t in TARGETS if t not in tc.LOSSY]
RLE, JLS, JLS_NEAR = "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"
J2K_LOSSLESS, J2K = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"
JPEG_LOSSY = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")
JPEG_LOSSLESS = ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70")
BIG_ENDIAN = "1.2.840.10008.1.2.2"

# pydicom's bundled files: 8/12/16/32-bit, signed, RGB planar 0/1, YBR, palette, multi-frame,
# 1-bit, big endian, implicit, deflated and every encapsulated family as input.
PYDICOM_INPUTS = [
    "CT_small.dcm",  # 16-bit signed, explicit LE
    "MR_small_implicit.dcm",  # 16-bit signed, implicit LE
    "MR_small_bigendian.dcm",  # 16-bit signed, big endian
    "examples_overlay.dcm",  # 12 bits in 16, unsigned
    "image_dfl.dcm",  # 8-bit greyscale, deflated
    "examples_rgb_color.dcm",  # RGB 8-bit, planar configuration 0
    "ExplVR_BigEnd.dcm",  # RGB 8-bit, planar configuration 1, big endian
    "SC_ybr_full_422_uncompressed.dcm",  # native YBR_FULL_422
    "examples_palette.dcm",  # PALETTE COLOR
    "SC_rgb_rle_16bit_2frame.dcm",  # RGB 16-bit, 2 frames, RLE
    "rtdose.dcm",  # 32-bit greyscale, 15 frames, implicit
    "liver_1frame.dcm",  # 1-bit (BitsAllocated 1)
    "JPGExtended.dcm",  # JPEG extended 12-bit
    "examples_ybr_color.dcm",  # JPEG baseline YBR_FULL_422, 30 frames
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless RGB
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS signed
    "GDCMJ2K_TextGBR.dcm",  # JPEG 2000 lossless YBR_RCT
    "693_J2KI.dcm",  # JPEG 2000 lossy, 14 bits signed
    "SC_rgb_small_odd.dcm",  # 3x3 RGB: too small for the JPEG 2000 / JPEG-LS encoders
]
# One sample per supported syntax, named (not globbed): without ../shared these cases are
# reported as skipped (failed in CI) instead of vanishing, and a renamed file fails its cases.
SHARED_SYNTAX_INPUTS = [f"TransferSyntaxes/{target}.dcm" for target in TARGETS]
SHARED_INPUTS = SHARED_SYNTAX_INPUTS + [
    "2022-11-14-RLEPlanarConfiguration.dcm",  # RLE RGB with planar configuration 1, 1475x1475
    "ColorTestImageJ.dcm",  # native RGB, planar configuration 1
    "Issue19.dcm",  # native YBR_FULL
]

# Exact refusals: (input, target) -> text the CannotTranscode message contains. Anything not
# listed here must succeed.
SIGNED = "JPEG lossy cannot hold signed pixel data"
ONE_BIT = "BitsAllocated 1 (bit-packed) pixel data can only be written in"
NOT_8_BITS = "BitsAllocated must be 8"
OVER_12 = "BitsStored must be at most 12"
PROFILE = "the image pixel module is not allowed in this syntax; allowed: "
TOO_SMALL_J2K = "Rows and Columns must be at least 32 for the OpenJPEG encoder"
TOO_SMALL_JLS = "the CharLS (pyjpegls) encoder failed (RuntimeError raised)"
J2K_24_BITS = "BitsStored must be at most 24 for OpenJPEG"
YBR_JPEG = "colour data cannot be stored losslessly by the JPEG encoder"
PALETTE = "PALETTE COLOR indices cannot be compressed lossily"


def _refusals() -> dict[tuple[str, str], str]:
    refused: dict[tuple[str, str], str] = {}
    for name in ("CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                 "MR_small_jpeg_ls_lossless.dcm", "693_J2KI.dcm"):
        for target in JPEG_LOSSY:
            refused[name, target] = SIGNED
    for name in ("TransferSyntaxes/1.2.840.10008.1.2.4.70.dcm",
                 "TransferSyntaxes/1.2.840.10008.1.2.4.80.dcm",
                 "TransferSyntaxes/1.2.840.10008.1.2.4.81.dcm",
                 "TransferSyntaxes/1.2.840.10008.1.2.4.90.dcm",
                 "TransferSyntaxes/1.2.840.10008.1.2.4.91.dcm",
                 "TransferSyntaxes/1.2.840.10008.1.2.5.dcm"):
        for target in JPEG_LOSSY:
            refused[name, target] = SIGNED
    for target in TARGETS:
        if target not in tc.NATIVE:
            refused["liver_1frame.dcm", target] = ONE_BIT
    # JPEG baseline is 8-bit only; extended holds 12-bit greyscale, 8-bit colour.
    for name in ("examples_overlay.dcm", "JPGExtended.dcm",
                 "TransferSyntaxes/1.2.840.10008.1.2.1.99.dcm",
                 "TransferSyntaxes/1.2.840.10008.1.2.4.57.dcm",
                 "TransferSyntaxes/1.2.840.10008.1.2.dcm",
                 "TransferSyntaxes/1.2.840.10008.1.2.4.51.dcm",
                 "rtdose.dcm", "SC_rgb_rle_16bit_2frame.dcm"):
        refused[name, JPEG_LOSSY[0]] = NOT_8_BITS
    refused["SC_rgb_rle_16bit_2frame.dcm", JPEG_LOSSY[1]] = NOT_8_BITS
    refused["rtdose.dcm", JPEG_LOSSY[1]] = OVER_12
    # 32-bit data: beyond pydicom's RLE/JPEG-LS profiles and JPEG's 16 bits.
    refused["rtdose.dcm", RLE] = PROFILE
    refused["rtdose.dcm", JLS] = PROFILE
    refused["rtdose.dcm", JLS_NEAR] = PROFILE
    for target in JPEG_LOSSLESS:
        refused["rtdose.dcm", target] = "BitsStored must be at most 16"
    # OpenJPEG (pylibjpeg) holds at most 24 bits; its 6 resolution levels need >= 32 pixels.
    refused["rtdose.dcm", J2K_LOSSLESS] = TOO_SMALL_J2K  # 10x10 (and 32 bits)
    refused["rtdose.dcm", J2K] = TOO_SMALL_J2K
    refused["SC_rgb_small_odd.dcm", J2K_LOSSLESS] = TOO_SMALL_J2K
    refused["SC_rgb_small_odd.dcm", J2K] = TOO_SMALL_J2K
    refused["SC_rgb_small_odd.dcm", JLS] = TOO_SMALL_JLS
    # Native YBR_FULL / YBR_FULL_422 (decoded as YBR_FULL) through libjpeg-turbo lossless.
    for name in ("Issue19.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        for target in JPEG_LOSSLESS:
            refused[name, target] = YBR_JPEG
    for target in tc.LOSSY:
        refused["examples_palette.dcm", target] = PALETTE
    return refused


REFUSED = _refusals()


def _load(name: str) -> Dataset:
    if name in PYDICOM_INPUTS:
        return pydicom.dcmread(get_testdata_file(name))
    return pydicom.dcmread(sample(name), force=True)


_CACHE: dict[str, tuple[Dataset, Dataset, bytes, np.ndarray, str]] = {}


def _source(name: str) -> tuple[Dataset, Dataset, bytes, np.ndarray, str]:
    """The dataset, a copy to read attributes from (reading converts pydicom's raw elements,
    which would change the bytes), its serialised bytes (to prove that transcode leaves it
    untouched) and its decoded pixels."""
    if name not in _CACHE:
        ds = _load(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr, pi = tc.decode_pixels(ds)
        _CACHE[name] = (ds, copy.deepcopy(ds), _to_bytes(ds), arr, pi)
    return _CACHE[name]


def _to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(buffer, ds, enforce_file_format=False)
    return buffer.getvalue()


def _reread(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


# The 1475x1475 planar RLE file costs ~1 s per target: only the targets that matter for it.
ONLY = {
    "2022-11-14-RLEPlanarConfiguration.dcm": {
        "1.2.840.10008.1.2.1", RLE, JLS, J2K_LOSSLESS, JPEG_LOSSY[0], JPEG_LOSSLESS[1],
    },
}


def _matrix_cases() -> list[object]:
    cases = []
    for name in PYDICOM_INPUTS + SHARED_INPUTS:
        for target in TARGETS:
            if target in ONLY.get(name, TARGETS):
                cases.append(pytest.param(name, target, id=f"{name}->{target}"))
    return cases


def test_the_shared_syntax_inputs_are_every_file_of_the_folder(samples: Path) -> None:
    """A sample added to TransferSyntaxes/ (a new syntax) must join the matrix."""
    listed = sorted(f"TransferSyntaxes/{p.name}" for p in (samples / "TransferSyntaxes").iterdir())
    assert listed == sorted(SHARED_SYNTAX_INPUTS)


@pytest.mark.parametrize(("name", "target"), _matrix_cases())
def test_round_trip_matrix(name: str, target: str) -> None:
    ds, info, before, src_arr, src_pi = _source(name)
    expected_refusal = REFUSED.get((name, target))
    if expected_refusal is not None:
        with pytest.raises(CannotTranscode) as refusal:
            tc.transcode(ds, target)
        assert expected_refusal in str(refusal.value)
        assert refusal.value.reason == "cannot_transcode"
        _assert_no_patient_data(str(refusal.value), info)
        assert _to_bytes(ds) == before
        return

    result = tc.transcode_result(ds, target)
    assert _to_bytes(ds) == before, "the source dataset was modified"
    assert result.dataset is not ds
    assert result.dataset.file_meta.TransferSyntaxUID == target
    back = _reread(result.dataset)
    assert back.file_meta.TransferSyntaxUID == target
    got, got_pi = tc.decode_pixels(back)
    assert got.shape == src_arr.shape

    if target not in tc.LOSSY or not result.recoded:
        assert np.array_equal(got, src_arr), "lossless transcode changed the pixels"
        assert result.lossy is False
    else:
        _assert_small_error(got, got_pi, src_arr, src_pi, target, back)
        _assert_lossy_attributes(back, result, target)
    _assert_pixel_module(back, info, src_pi, target, result.recoded)


def _assert_no_patient_data(message: str, ds: Dataset) -> None:
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SOPInstanceUID"):
        value = str(ds.get(keyword, "") or "")
        if len(value) > 3:
            assert value not in message, keyword


def _assert_small_error(
    got: np.ndarray, got_pi: str, src: np.ndarray, src_pi: str, target: str, back: Dataset
) -> None:
    if got_pi == "RGB" and src_pi in ("YBR_FULL", "YBR_FULL_422"):
        src = convert_color_space(src.copy(), "YBR_FULL", "RGB", per_frame=True)
    error = np.abs(got.astype(np.int64) - src.astype(np.int64))
    if target == JLS_NEAR:
        assert int(error.max()) <= tc.JLS_NEAR
    # Real images at IJG quality 90 or J2K 10:1 stay well under 2% of the full scale.
    assert float(error.mean()) <= 0.02 * 2 ** int(back.BitsStored)


def _assert_lossy_attributes(back: Dataset, result: tc.TranscodeResult, target: str) -> None:
    method = {JPEG_LOSSY[0]: "ISO_10918_1", JPEG_LOSSY[1]: "ISO_10918_1",
              JLS_NEAR: "ISO_14495_1", J2K: "ISO_15444_1"}[target]
    assert result.lossy is True
    assert back.LossyImageCompression == "01"
    methods = back.LossyImageCompressionMethod
    ratios = back.LossyImageCompressionRatio
    methods = [methods] if isinstance(methods, str) else list(methods)
    ratios = list(ratios) if isinstance(ratios, pydicom.multival.MultiValue) else [ratios]
    assert methods[-1] == method
    assert len(methods) == len(ratios)
    assert str(ratios[-1]) == f"{result.compression_ratio:.5g}"
    assert back.DerivationCodeSequence[-1].CodeValue == "113040"
    assert (back.ImageType if isinstance(back.ImageType, str) else back.ImageType[0]) == "DERIVED"


def _assert_pixel_module(
    back: Dataset, source: Dataset, src_pi: str, target: str, recoded: bool
) -> None:
    samples = int(back.SamplesPerPixel)
    if not recoded:
        assert back.PhotometricInterpretation == source.PhotometricInterpretation
        if samples > 1:
            assert back.PlanarConfiguration == source.PlanarConfiguration
        return
    if samples == 1:
        assert back.PhotometricInterpretation == source.PhotometricInterpretation
        return
    expected_pi = {
        JPEG_LOSSY[0]: "YBR_FULL_422",
        JPEG_LOSSY[1]: "YBR_FULL_422",
        J2K_LOSSLESS: "YBR_RCT" if src_pi == "RGB" else src_pi,
        J2K: "YBR_ICT" if src_pi == "RGB" else src_pi,
    }.get(target, src_pi)
    assert back.PhotometricInterpretation == expected_pi
    assert back.PlanarConfiguration == (1 if target == RLE else 0)


# --- no pixel data, no-op, 1-bit, big endian --------------------------------------------------


def _no_pixel_inputs() -> list[str]:
    return ["rtplan.dcm", "rtstruct.dcm"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", _no_pixel_inputs())
def test_no_pixel_data_only_changes_the_transfer_syntax(name: str, target: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name), force=True)
    result = tc.transcode_result(ds, target)
    assert result.recoded is False and result.lossy is False
    back = _reread(result.dataset)
    assert back.file_meta.TransferSyntaxUID == target
    original = _reread(ds)
    assert [e.tag for e in back] == [e.tag for e in original]
    for elem in original:
        assert back[elem.tag].value == elem.value, elem.keyword


def test_pdf_to_every_target_keeps_the_document() -> None:
    ds = pydicom.dcmread(sample("sample-pdf.dcm"))
    for target in TARGETS:
        back = _reread(tc.transcode(ds, target))
        assert back.file_meta.TransferSyntaxUID == target
        assert back.EncapsulatedDocument == ds.EncapsulatedDocument


def test_same_syntax_is_a_copy() -> None:
    ds = pydicom.dcmread(get_testdata_file("JPGExtended.dcm"))
    result = tc.transcode_result(ds, "1.2.840.10008.1.2.4.51")
    assert result.dataset is not ds
    assert result.recoded is False and result.verified is False
    assert result.dataset.PixelData == ds.PixelData
    result.dataset.PatientName = "Changed^Copy"
    assert ds.PatientName != "Changed^Copy"


@pytest.mark.parametrize("name", ["liver_1frame.dcm", "liver_expb_1frame.dcm"])
def test_one_bit_native_targets_keep_the_packed_bits(name: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name))
    expected = ds.pixel_array
    for target in sorted(tc.NATIVE):
        back = _reread(tc.transcode(ds, target))
        assert back.BitsAllocated == 1
        assert np.array_equal(back.pixel_array, expected)
        assert back.PixelData == ds.PixelData  # bit-packed bytes have no byte order


def test_one_bit_refused_in_a_child_process_that_stays_alive() -> None:
    """python-gdcm aborts the interpreter on 1-bit data; we must refuse before any codec runs."""
    code = (
        "import pydicom\n"
        "from pydicom.data import get_testdata_file\n"
        "from transforms import transcode as tc\n"
        "from transforms.errors import CannotTranscode\n"
        "ds = pydicom.dcmread(get_testdata_file('liver_1frame.dcm'))\n"
        "for target in tc.SUPPORTED:\n"
        "    if target in tc.NATIVE:\n"
        "        continue\n"
        "    try:\n"
        "        tc.transcode(ds, target)\n"
        "    except CannotTranscode as exc:\n"
        "        print('refused', exc.reason)\n"
        "print('alive')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).parents[1], check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["refused cannot_transcode"] * 9 + ["alive"]


def test_big_endian_swaps_16_bit_pixels_and_back() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    big = tc.transcode(ds, BIG_ENDIAN)
    raw = np.frombuffer(ds.PixelData, dtype="<i2")
    assert big.PixelData == raw.astype(">i2").tobytes()
    back = _reread(big)
    assert back.file_meta.TransferSyntaxUID == BIG_ENDIAN
    assert np.array_equal(back.pixel_array, ds.pixel_array)
    assert back.Rows == 128 and back.RescaleIntercept == ds.RescaleIntercept
    little = _reread(tc.transcode(back, "1.2.840.10008.1.2.1"))
    assert little.PixelData == ds.PixelData


def test_big_endian_swaps_nested_ow_values() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.LUTData = [1, 2, 515, 65535]
    item["LUTData"].VR = "OW"
    item.LUTData = np.array([1, 2, 515, 65535], "<u2").tobytes()
    ds.VOILUTSequence = [item]
    back = _reread(tc.transcode(ds, BIG_ENDIAN))
    lut = back.VOILUTSequence[0]
    assert back.is_little_endian is False
    assert list(np.frombuffer(lut.LUTData, ">u2")) == [1, 2, 515, 65535]
    assert list(lut.LUTDescriptor) == [4, 0, 16]


def _with_compressed_icon() -> tuple[Dataset, np.ndarray, np.ndarray]:
    """A JPEG Lossless (.70) image whose Icon Image Sequence item holds JPEG Lossless pixel
    data too (PS3.5 A.4 lets nested Pixel Data be encapsulated), read back from its bytes."""
    imagecodecs = pytest.importorskip("imagecodecs")
    from pydicom.encaps import encapsulate

    rng = np.random.default_rng(7)
    main = rng.integers(0, 256, (96, 80), dtype=np.uint8)
    icon = rng.integers(0, 256, (64, 48), dtype=np.uint8)

    def pixel_module(d: Dataset, arr: np.ndarray) -> None:
        d.Rows, d.Columns = arr.shape
        d.SamplesPerPixel, d.PhotometricInterpretation = 1, "MONOCHROME2"
        d.BitsAllocated, d.BitsStored, d.HighBit, d.PixelRepresentation = 8, 8, 7, 0
        d.PixelData = encapsulate([imagecodecs.jpeg8_encode(arr, lossless=True, predictor=1, bitspersample=8)])
        d["PixelData"].VR = "OB"
        d["PixelData"].is_undefined_length = True

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEG_LOSSLESS[1]
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.PatientName, ds.Modality = "ICON^TEST", "OT"
    pixel_module(ds, main)
    item = Dataset()
    pixel_module(item, icon)
    ds.IconImageSequence = [item]
    return _reread(ds), main, icon


@pytest.mark.parametrize("target", ["1.2.840.10008.1.2.1", BIG_ENDIAN, RLE, JLS, J2K_LOSSLESS, JPEG_LOSSLESS[0]])
def test_a_compressed_icon_becomes_native_with_the_image(target: str) -> None:
    """The icon's JPEG fragments used to be copied as they were: encapsulated data in a native
    syntax, or a JPEG codestream labelled RLE or JPEG-LS (exit 0, an undecodable icon). Nested
    Pixel Data may be native in any syntax: it is decoded, stored native (defined length, the
    target's byte order), its pixels exact; the input is untouched."""
    ds, main, icon = _with_compressed_icon()
    snapshot = copy.deepcopy(ds)
    back = _reread(tc.transcode(ds, target))
    assert ds == snapshot
    assert str(back.file_meta.TransferSyntaxUID) == target
    assert np.array_equal(tc.decode_pixels(back)[0][0, ..., 0], main)
    item = back.IconImageSequence[0]
    assert item["PixelData"].is_undefined_length is False
    assert len(item.PixelData) == icon.size
    assert np.frombuffer(item.PixelData, np.uint8).reshape(icon.shape).tolist() == icon.tolist()
    assert (item.Rows, item.Columns, item.BitsAllocated, item.PhotometricInterpretation) == (64, 48, 8, "MONOCHROME2")


def test_a_compressed_icon_in_a_sequence_read_as_un_becomes_native_too() -> None:
    """The same Icon Image Sequence with VR UN in its header (as some writers store what they do
    not know): read as the dictionary's SQ, decoded like it."""
    ds, main, icon = _with_compressed_icon()
    data = _to_bytes(ds)
    header = b"\x88\x00\x00\x02SQ"
    assert data.count(header) == 1
    ds = pydicom.dcmread(io.BytesIO(data.replace(header, b"\x88\x00\x00\x02UN")))
    assert ds.get_item(0x00880200).VR == "UN"
    back = _reread(tc.transcode(ds, "1.2.840.10008.1.2.1"))
    item = back.IconImageSequence[0]
    assert item["PixelData"].is_undefined_length is False
    assert np.frombuffer(item.PixelData, np.uint8).reshape(icon.shape).tolist() == icon.tolist()


def test_text_beside_a_decoded_icon_keeps_the_bytes_read() -> None:
    """Only the icon's pixel module changes: text in its item (here bytes that are not the UTF-8
    the file declares) is written as read, as everywhere else in a transcode."""
    from transforms.dicomio import read_dataset, write_dataset

    ds, _, _ = _with_compressed_icon()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.IconImageSequence[0].ImageComments = "Cafe"
    data = _to_bytes(ds)
    assert data.count(b"Cafe") == 1
    data = data.replace(b"Cafe", b"Caf\xe9")  # Latin-1 in a UTF-8 file
    out = write_dataset(tc.transcode(read_dataset(data), "1.2.840.10008.1.2.1"))
    assert b"Caf\xe9" in out
    assert pydicom.dcmread(io.BytesIO(out)).IconImageSequence[0]["PixelData"].is_undefined_length is False


def test_a_nested_image_is_held_to_the_decoded_size_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    ds, _, _ = _with_compressed_icon()
    monkeypatch.setattr(tc, "MAX_DECODED_BYTES", 64 * 48 - 1)  # the icon's size; the image's is larger
    with pytest.raises(CannotTranscode, match=r"the Pixel Data in IconImageSequence cannot be decoded \(the "
                                               r"decoded pixel data would take 3,072 bytes"):
        tc.transcode(ds, "1.2.840.10008.1.2.1")


def test_an_icon_that_cannot_be_decoded_fails_the_transcode() -> None:
    ds, _, _ = _with_compressed_icon()
    from pydicom.encaps import encapsulate

    ds.IconImageSequence[0].PixelData = encapsulate([b"\xff\xd8 not a codestream \xff\xd9"])
    ds.IconImageSequence[0]["PixelData"].is_undefined_length = True
    with pytest.raises(CannotTranscode) as caught:
        tc.transcode(ds, "1.2.840.10008.1.2.1")
    assert str(caught.value).startswith(
        "Transcode to 1.2.840.10008.1.2.1 (Explicit VR Little Endian): the Pixel Data in IconImageSequence "
        "cannot be decoded (")
    assert "ICON" not in str(caught.value)


@pytest.mark.parametrize("target", [J2K_LOSSLESS, RLE, BIG_ENDIAN])
def test_a_pixel_attribute_that_is_not_an_integer_is_named(target: str) -> None:
    """pydicom's badVR.dcm has NumberOfFrames "1A": it used to fail as "ValueError raised",
    a codec's failure; it is the file's (invalid_value), and the attribute is named."""
    from transforms.errors import InputError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file("badVR.dcm"))
        with pytest.raises(InputError) as caught:
            tc.transcode(ds, target)
    assert (caught.value.reason, str(caught.value)) == (
        "invalid_value", "NumberOfFrames is not an integer: the pixels cannot be transcoded")


def test_a_pixel_attribute_that_is_not_an_integer_does_not_stop_a_change_of_vr_encoding() -> None:
    """Explicit to implicit VR little endian keeps the pixel bytes: nothing reads NumberOfFrames."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file("badVR.dcm"))
        back = tc.transcode(ds, "1.2.840.10008.1.2")
    assert str(back.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2"
    assert back.PixelData == ds.PixelData


def test_float_pixel_data_only_goes_to_native_syntaxes() -> None:
    ds = _float_dataset()
    with pytest.raises(CannotTranscode, match="FloatPixelData"):
        tc.transcode(ds, RLE)
    back = _reread(tc.transcode(ds, BIG_ENDIAN))
    assert list(np.frombuffer(back.FloatPixelData, ">f4")) == [0.5, -1.25, 3.0, 1e6]


def _float_dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated = 2, 2, 1, 32
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.FloatPixelData = np.array([0.5, -1.25, 3.0, 1e6], "<f4").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_file_without_meta_header_is_read_as_implicit() -> None:
    ds = pydicom.dcmread(sample("TransferSyntaxes/1.2.840.10008.1.2.dcm"), force=True)
    assert "TransferSyntaxUID" not in getattr(ds, "file_meta", {})
    assert tc.source_syntax(ds) == "1.2.840.10008.1.2"
    result = tc.transcode_result(ds, JLS)
    assert result.source_syntax == "1.2.840.10008.1.2" and result.verified is True


# --- signed 12-bit, lossy bookkeeping, verification -------------------------------------------


def _signed_12_bit() -> Dataset:
    """CT_small with 12 stored bits: values in [-2048, 2047], sign-extended in 16 bits."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    arr = (ds.pixel_array.astype(np.int32) * 2 - 2500).clip(-2048, 2047).astype("<i2")
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelData = arr.tobytes()
    return ds


@pytest.mark.parametrize("target", LOSSLESS)
def test_signed_12_bit_lossless_is_exact(target: str) -> None:
    ds = _signed_12_bit()
    source = ds.pixel_array
    assert int(source.min()) == -2048 and int(source.max()) > 0
    back = _reread(tc.transcode(ds, target))
    got, _ = tc.decode_pixels(back)
    assert np.array_equal(got.reshape(source.shape), source)


def test_signed_near_lossless_needs_values_away_from_the_range_ends() -> None:
    """_signed_12_bit reaches -2048 and 2047: JPEG-LS does not record the sign and NEAR=2 could
    flip it there, so pydicom refuses; the reason used to be "ValueError raised" (a review).
    Two steps in from both ends, the same image is encoded."""
    ds = _signed_12_bit()
    with pytest.raises(tc.CannotTranscode) as refused:
        tc.transcode(ds, JLS_NEAR)
    assert str(refused.value) == (
        "Transcode to 1.2.840.10008.1.2.4.81 (JPEG-LS Lossy (Near-Lossless)): signed pixel values must lie within "
        "-2046..2045 (JPEG-LS does not record the sign, and an error of up to NEAR=2 would flip it at the range's "
        "ends)")
    inside = np.frombuffer(ds.PixelData, "<i2").clip(-2046, 2045)
    ds.PixelData = inside.astype("<i2").tobytes()
    back = _reread(tc.transcode(ds, JLS_NEAR))
    got, _ = tc.decode_pixels(back)
    assert int(np.abs(got.reshape(-1).astype(int) - inside.astype(int)).max()) <= 2


def test_lossy_steps_are_appended() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = "5"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.DerivationDescription = "earlier step"
    result = tc.transcode_result(ds, J2K)
    out = result.dataset
    ratio = f"{result.compression_ratio:.5g}"
    assert list(out.LossyImageCompressionRatio) == ["5", ratio]
    assert list(out.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_15444_1"]
    assert list(out.ImageType) == ["DERIVED", "PRIMARY", "AXIAL"]
    assert out.DerivationDescription == (
        f"Lossy compression with JPEG 2000, compression ratio {ratio} [earlier step]"
    )
    assert [(i.CodeValue, i.CodingSchemeDesignator, i.CodeMeaning)
            for i in out.DerivationCodeSequence] == [("113040", "DCM", "Lossy Compression")]
    assert 9.0 < result.compression_ratio < 12.0  # asked for 10:1
    assert ds.LossyImageCompressionRatio == "5" and "DerivationCodeSequence" not in ds


@pytest.mark.parametrize("earlier", [b"abc ", b"1.2.3 ", b"nan "])
def test_an_earlier_ratio_that_is_no_number_gives_way_to_the_new_step(earlier: bytes) -> None:
    """Found by a review: an earlier LossyImageCompressionRatio such as "abc" failed every lossy
    target as 'ValueError raised' (the encoder blamed); it is unreadable history, recorded
    alone as where ratios and methods do not pair up."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = "5"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    data = buffer.getvalue().replace(b"DS\x02\x005 ", b"DS" + len(earlier).to_bytes(2, "little") + earlier)
    assert earlier in data
    ds = pydicom.dcmread(io.BytesIO(data))
    result = tc.transcode_result(ds, J2K)
    assert result.dataset.LossyImageCompressionRatio == f"{result.compression_ratio:.5g}"
    assert result.dataset.LossyImageCompressionMethod == "ISO_15444_1"


def test_jpeg_baseline_of_rgb_matches_dcmtk_conventions() -> None:
    ds = pydicom.dcmread(get_testdata_file("examples_rgb_color.dcm"))
    result = tc.transcode_result(ds, JPEG_LOSSY[0])
    out = result.dataset
    assert out.PhotometricInterpretation == "YBR_FULL_422"
    assert out.PlanarConfiguration == 0
    assert out.LossyImageCompressionMethod == "ISO_10918_1"
    assert out.DerivationDescription == (
        "Lossy compression with JPEG baseline, IJG quality factor 90, compression ratio "
        f"{result.compression_ratio:.5g}"
    )
    frame = next(pydicom.encaps.generate_frames(out.PixelData, number_of_frames=1))
    sof = frame.index(b"\xff\xc0")
    assert frame[sof + 11] == 0x21  # luminance sampled 2x1: 4:2:2


# For each lossless syntax, a decoder independent of the encoder's library (transcode's own
# check decodes with that library) that the project's dependencies provide, so every case runs:
# pydicom's pure-Python RLE decoder (the encoder is pylibjpeg-rle), Pillow's OpenJPEG build
# (Pillow comes with apache-beam; the encoder is pylibjpeg-openjpeg) and imagecodecs' jpegsof3
# lossless-JPEG decoder (the codecs extra; the encoder is libjpeg-turbo). JPEG-LS has none:
# every JPEG-LS decoder the extras bring (pyjpegls, imagecodecs) is CharLS, the encoder itself.
OTHER_DECODERS = [(RLE, "pydicom"), (J2K_LOSSLESS, "pillow"), (JPEG_LOSSLESS[0], "jpegsof3"),
                  (JPEG_LOSSLESS[1], "jpegsof3")]


@pytest.mark.parametrize(("target", "decoder"), OTHER_DECODERS)
@pytest.mark.parametrize("name", ["CT_small.dcm", "examples_rgb_color.dcm"])
def test_lossless_output_decodes_exactly_with_another_decoder(name: str, target: str, decoder: str) -> None:
    """Our verification decodes with the encoder's own library; a second one must agree."""
    ds = pydicom.dcmread(get_testdata_file(name))
    back = _reread(tc.transcode(ds, target))
    if decoder == "jpegsof3":
        import imagecodecs

        [frame] = pydicom.encaps.generate_frames(back.PixelData, number_of_frames=1)
        # jpegsof3 returns the stored bits unsigned; CT_small's are two's complement (int16)
        arr = imagecodecs.jpegsof3_decode(frame).view(ds.pixel_array.dtype)
    else:
        arr, _ = pydicom.pixels.get_decoder(target).as_array(back, decoding_plugin=decoder, raw=True)
    assert np.array_equal(arr, ds.pixel_array)


def test_verification_catches_a_corrupting_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    imagecodecs = pytest.importorskip("imagecodecs")
    real = imagecodecs.jpeg8_encode

    def off_by_one(data: np.ndarray, *args: object, **kwargs: object) -> bytes:
        return real(data ^ 1, *args, **kwargs)

    monkeypatch.setattr(imagecodecs, "jpeg8_encode", off_by_one)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with pytest.raises(CannotTranscode, match="round trip differs in 16384 samples") as info:
        tc.transcode(ds, "1.2.840.10008.1.2.4.70")
    assert info.value.reason == "cannot_transcode"
    _assert_no_patient_data(str(info.value), ds)
    unchecked = tc.transcode_result(ds, "1.2.840.10008.1.2.4.70", verify=False)
    assert unchecked.verified is False
    got, _ = tc.decode_pixels(unchecked.dataset)
    assert not np.array_equal(got.reshape(ds.pixel_array.shape), ds.pixel_array)


def test_codec_exceptions_become_cannot_transcode(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise MemoryError("codec ran out of memory")

    monkeypatch.setattr(tc, "_pydicom_compress", broken)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with pytest.raises(CannotTranscode) as info:
        tc.transcode(ds, RLE)
    assert str(info.value) == (
        "Transcode to 1.2.840.10008.1.2.5 (RLE Lossless): the RLE (pylibjpeg-rle or pydicom) "
        "encoder failed (MemoryError raised)"
    )
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_input_is_not_mutated_even_in_raw_elements() -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm"))
    raw_before = {tag for tag, elem in ds._dict.items() if getattr(elem, "is_raw", False)}
    snapshot = copy.deepcopy(ds)
    tc.transcode(ds, J2K_LOSSLESS)
    tc.transcode(ds, "1.2.840.10008.1.2.1")
    tc.decode_pixels(ds)
    raw_after = {tag for tag, elem in ds._dict.items() if getattr(elem, "is_raw", False)}
    assert raw_after == raw_before
    assert ds == snapshot


# --- request validation ------------------------------------------------------------------------


def test_supported_and_lossy_sets() -> None:
    assert TARGETS == [
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
    ]
    assert tc.LOSSY == {
        "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.91",
    }
    assert len(tc.ORTHANC_KNOWN) == 42
    assert set(tc.SUPPORTED) <= tc.ORTHANC_KNOWN
    assert "1.2.840.10008.1.2.4.201" not in tc.ORTHANC_KNOWN  # HTJ2K is newer than 1.10.1
    assert [tc.is_lossy(t) for t in TARGETS].count(True) == 4


def test_validate_target_accepts_every_supported_uid() -> None:
    for uid in TARGETS:
        assert tc.validate_target(uid) == uid


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("1.2.3.4", "Transcode: unknown transfer syntax UID 1.2.3.4; supported: "),
        ("JPEG", "Transcode: unknown transfer syntax UID; supported: "),
        (42, "Transcode: expected a transfer syntax UID string; supported: "),
        (None, "Transcode: expected a transfer syntax UID string; supported: "),
        (
            "1.2.840.10008.1.2.4.100",
            "Transcode: transfer syntax 1.2.840.10008.1.2.4.100 (MPEG2 Main Profile / Main "
            "Level) is known but cannot be written here; supported: ",
        ),
    ],
)
def test_validate_target_refusals_name_transcode_and_list_supported(
    value: object, text: str
) -> None:
    with pytest.raises(RequestError) as info:
        tc.validate_target(value)
    message = str(info.value)
    assert message.startswith(text)
    assert message.endswith(", ".join(TARGETS))
    assert info.value.reason == "refused_by_request"


def test_transcode_refuses_unknown_uid_before_touching_data() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with pytest.raises(RequestError, match="^Transcode: unknown transfer syntax UID 1.2.3;"):
        tc.transcode(ds, "1.2.3")


# --- the pipeline path: dicomio.read_dataset -> transcode -> dicomio.write_dataset -------------


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "examples_rgb_color.dcm",
                                  "SC_rgb_jpeg_gdcm.dcm"])
def test_through_dicomio(name: str, target: str) -> None:
    from transforms.dicomio import read_dataset, write_dataset

    data = Path(get_testdata_file(name)).read_bytes()
    ds = read_dataset(data)
    expected, _ = tc.decode_pixels(pydicom.dcmread(io.BytesIO(data)))
    if (name, target) in {("MR_small_bigendian.dcm", t) for t in JPEG_LOSSY}:
        with pytest.raises(CannotTranscode, match=SIGNED):
            tc.transcode(ds, target)
        return
    result = tc.transcode_result(ds, target)
    back = pydicom.dcmread(io.BytesIO(write_dataset(result.dataset)))
    assert back.file_meta.TransferSyntaxUID == target
    assert back.SOPInstanceUID == pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID
    got, _ = tc.decode_pixels(back)
    if target in tc.LOSSY and result.recoded:
        assert got.shape == expected.shape
    else:
        assert np.array_equal(got, expected)
    assert write_dataset(ds) == write_dataset(read_dataset(data))  # input left as read


@pytest.mark.parametrize("target", [BIG_ENDIAN, "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.80"])
@pytest.mark.parametrize("source_implicit", [False, True])
def test_text_invalid_in_its_character_set_keeps_its_bytes(target: str, source_implicit: bool) -> None:
    # A byte order change converts every element; pydicom decoded and re-encoded the text
    # ("?" for each byte invalid in the declared character set). Text has no byte order.
    from tests.test_dicomio import _BAD_NAME, _BAD_NESTED, _BAD_TOP, _damaged_text_file
    from transforms.dicomio import read_dataset, write_dataset

    data = _damaged_text_file(source_implicit)
    out = write_dataset(tc.transcode(read_dataset(data), target))
    assert _BAD_TOP in out and _BAD_NESTED in out and _BAD_NAME in out
    back = pydicom.dcmread(io.BytesIO(out))
    assert back.file_meta.TransferSyntaxUID == target
    assert np.array_equal(tc.decode_pixels(back)[0], tc.decode_pixels(pydicom.dcmread(io.BytesIO(data)))[0])
    assert list(back.RequestAttributesSequence[0][0x00281101].value) == [256, 0, 16]


@pytest.mark.parametrize("planted", ["PLANTEDGIVEN", "YBR_PLANTED", "RGB PLANTED"])
def test_failure_messages_never_quote_file_values(planted: str) -> None:
    """pydicom and the codecs quote element values in their errors: none may reach ours."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PhotometricInterpretation = planted
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    refused = 0
    for target in TARGETS:
        try:
            tc.transcode(ds, target)
        except CannotTranscode as exc:
            refused += 1
            assert "PLANTED" not in str(exc)
            assert exc.__cause__ is None and exc.__suppress_context__
    assert refused >= 9  # every compressed target: the photometric interpretation is invalid


def test_lossy_transcode_for_plan_gives_a_new_sop_instance_uid_unless_kept():
    from io import BytesIO as _BytesIO

    from pydicom.data import get_testdata_file as _get

    from transforms import dicomio as _dicomio
    from transforms.engine import apply as _apply
    from transforms.identity import Key as _Key
    from transforms.request import parse_modify as _parse_modify
    from transforms.transcode import transcode_for_plan

    data = open(_get("CT_small.dcm"), "rb").read()
    ds = _dicomio.read_dataset(data)
    key = _Key.from_bytes(b"t" * 32)
    original = str(ds.SOPInstanceUID)

    lossless = _parse_modify({"Transcode": "1.2.840.10008.1.2.4.70"})
    out = transcode_for_plan(lossless, _apply(lossless, ds, key), key).dataset
    modified_uid = str(_apply(lossless, ds, key).SOPInstanceUID)
    assert out.SOPInstanceUID == modified_uid  # lossless: the modification's UID stays

    lossy = _parse_modify({"Transcode": "1.2.840.10008.1.2.4.91"})
    result = transcode_for_plan(lossy, _apply(lossy, ds, key), key)
    assert result.lossy
    new_uid = str(result.dataset.SOPInstanceUID)
    assert new_uid.startswith("2.25.") and new_uid not in (original, str(_apply(lossy, ds, key).SOPInstanceUID))
    assert new_uid == key.uid("lossy.1.2.840.10008.1.2.4.91", str(_apply(lossy, ds, key).SOPInstanceUID))
    written = pydicom.dcmread(_BytesIO(_dicomio.write_dataset(result.dataset)))
    assert written.file_meta.MediaStorageSOPInstanceUID == new_uid == written.SOPInstanceUID
    assert written.LossyImageCompression == "01"
    # the new image names the one it was made from, as DCMTK does (121320, PS3.3 C.7.6.1.2)
    [predecessor] = written.SourceImageSequence
    assert (predecessor.ReferencedSOPClassUID, predecessor.ReferencedSOPInstanceUID) == (
        "1.2.840.10008.5.1.4.1.1.2", str(_apply(lossy, ds, key).SOPInstanceUID))
    [purpose] = predecessor.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "121320", "DCM", "Uncompressed predecessor")
    assert "SourceImageSequence" not in out  # lossless: nothing to name
    plain = _parse_modify({})  # the same body without Transcode writes the predecessor
    assert str(_apply(plain, ds, key).SOPInstanceUID) == predecessor.ReferencedSOPInstanceUID

    kept = _parse_modify({"Transcode": "1.2.840.10008.1.2.4.91", "Keep": ["SOPInstanceUID"], "Force": True})
    result = transcode_for_plan(kept, _apply(kept, ds, key), key)
    assert result.lossy and result.dataset.SOPInstanceUID == original
    assert "SourceImageSequence" not in result.dataset  # the same identity: no predecessor


def test_predecessor_follows_the_source_images_an_image_already_had():
    """A derived image keeps its SourceImageSequence items (unchanged, the input's untouched)
    and gains the predecessor after them."""
    from transforms.engine import apply as _apply
    from transforms.identity import Key as _Key
    from transforms.request import parse_anonymize as _parse_anonymize
    from transforms.transcode import transcode_for_plan

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    earlier = Dataset()
    earlier.ReferencedSOPClassUID, earlier.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5"
    ds.SourceImageSequence = [earlier]
    plan = _parse_anonymize({"DicomVersion": "2021b", "Transcode": J2K})
    key = _Key.from_bytes(b"t" * 32)
    anonymized = _apply(plan, ds, key)
    out = transcode_for_plan(plan, anonymized, key).dataset
    assert [i.ReferencedSOPInstanceUID for i in out.SourceImageSequence] == [
        key.uid("anonymize.instance", "1.2.3.4.5"), str(anonymized.SOPInstanceUID)]  # the profile keeps the item, remapped
    assert len(anonymized.SourceImageSequence) == 1 and len(ds.SourceImageSequence) == 1


def test_compression_ratio_counts_bits_stored_as_dcmtk():
    """A 12-bit image in 16-bit words: the uncompressed size is counted at 12 bits per sample
    (Orthanc 1.10.1 writes 6.8031 for Brainix/Flair/IM-0001-0006.dcm, not 9.0709)."""
    ds = _signed_12_bit()
    ds.PixelRepresentation = 0
    ds.PixelData = (np.frombuffer(ds.PixelData, "<i2") & 0x0FFF).astype("<u2").tobytes()
    result = tc.transcode_result(ds, JPEG_LOSSY[1])
    compressed = sum(len(f) for f in pydicom.encaps.generate_frames(result.dataset.PixelData, number_of_frames=1))
    assert result.compression_ratio == ds.Rows * ds.Columns * 12 / 8 / compressed
    assert result.dataset.LossyImageCompressionRatio == f"{result.compression_ratio:.5g}"


# --------------------------------------------------------------------------- codec panics


def _rle_header_lies() -> Dataset:
    """SC_rgb_rle.dcm claiming 16-bit samples in a 3 x 3 image: pylibjpeg-rle's frame decoder
    (Rust) panics on it ("index out of bounds"), which pyo3 raises as PanicException, a
    BaseException."""
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm"))
    ds.Rows, ds.Columns, ds.BitsAllocated = 3, 3, 16
    return ds


@pytest.fixture
def panicking_rle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode RLE with pylibjpeg-rle's frame decoder only: the codec that panics (transcode
    no longer uses it, see test_rle_decoder.py, but a panic must stay a failed transcode)."""
    pytest.importorskip("rle", reason="pylibjpeg-rle (the codecs extra) is the codec that panics")
    monkeypatch.setattr(tc, "_DECODERS_RLE", ("pylibjpeg",))


def test_a_codec_panic_is_a_failed_transcode(panicking_rle: None):
    with pytest.raises(CannotTranscode) as refused:
        tc.transcode_result(_rle_header_lies(), "1.2.840.10008.1.2.1")
    assert str(refused.value) == (
        "cannot decode source transfer syntax 1.2.840.10008.1.2.5: pylibjpeg: PanicException raised"
    )


def test_a_codec_panic_is_a_failed_row_and_the_run_goes_on(tmp_path: Path, panicking_rle: None):
    from tests.pipeline_support import KEY
    from transforms import request
    from transforms.beam import RunConfig, process_file

    src = tmp_path / "in.dcm"
    _rle_header_lies().save_as(src)
    cfg = RunConfig(plan=request.parse_anonymize({"Transcode": "1.2.840.10008.1.2.1"}), output_root=str(tmp_path / "out"),
                    run_id="panic", key_id=KEY.key_id, key=KEY)
    row, _ = process_file(str(src), src.stat().st_size, cfg, KEY)
    assert (row["status"], row["reason"], row["output_uri"]) == ("failed", "cannot_transcode", None)
    assert "pylibjpeg: PanicException raised" in row["detail"]
    assert not (tmp_path / "out").exists() or not any(p.is_file() for p in (tmp_path / "out").rglob("*.dcm"))


def test_only_work_failures_are_caught():
    from transforms.errors import is_work_failure

    panic = type("PanicException", (BaseException,), {})
    assert is_work_failure(ValueError()) and is_work_failure(panic())
    assert not any(is_work_failure(e) for e in (KeyboardInterrupt(), SystemExit(1), GeneratorExit()))


# --- found by review: byte order of the other binary values, damaged or inconsistent sources ---

RLE = "1.2.840.10008.1.2.5"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"


@pytest.mark.parametrize("target", [RLE, J2K_LOSSLESS])
def test_big_endian_source_to_a_compressed_target_swaps_its_lookup_tables(target: str):
    """A big endian palette image: its LUTs (OW) follow the byte order change like the pixels
    (they used to keep big endian words: 256 read back as 1, half the colours wrong)."""
    source = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    big = _reread(tc.transcode(source, BIG_ENDIAN))
    assert big.file_meta.TransferSyntaxUID == BIG_ENDIAN
    out = _reread(tc.transcode(big, target))
    for colour in ("Red", "Green", "Blue"):
        keyword = f"{colour}PaletteColorLookupTableData"
        assert out[keyword].value == source[keyword].value, keyword
    assert np.array_equal(out.pixel_array, source.pixel_array)


def test_big_endian_8_bit_pixels_stored_ow_are_swapped_back():
    """DCMTK writes 8-bit pixels of a big endian file as OW: 16-bit words in big endian order.
    Such a file used to be refused ("pixels differ after byte swapping")."""
    source = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    big = tc.transcode(source, BIG_ENDIAN)
    big.PixelData = np.frombuffer(source.PixelData, dtype="<u2").byteswap().tobytes()
    big["PixelData"].VR = "OW"
    big = _reread(big)
    out = tc.transcode(big, ExplicitVRLittleEndian)
    assert out["PixelData"].VR == "OB" and out.PixelData == source.PixelData


def test_truncated_jpeg_source_is_refused():
    """libjpeg-turbo only warns about a codestream cut short and fills the missing rows."""
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    (frame,) = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    assert tc.transcode(ds, ExplicitVRLittleEndian).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    ds.PixelData = pydicom.encaps.encapsulate([frame[: len(frame) // 2]])
    with pytest.raises(CannotTranscode, match="does not end with its end-of-image marker: the codestream is truncated"):
        tc.transcode(ds, ExplicitVRLittleEndian)


def test_codestream_more_precise_than_bits_allocated_is_refused():
    """16-bit samples in a data set that says 8 bits: the decoders would cut them to 8."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    jls = _reread(tc.transcode(ds, "1.2.840.10008.1.2.4.80"))
    jls.BitsAllocated, jls.BitsStored, jls.HighBit, jls.PixelRepresentation = 8, 8, 7, 0
    with pytest.raises(CannotTranscode, match="the source codestream has 16-bit samples but BitsAllocated is 8"):
        tc.transcode(jls, ExplicitVRLittleEndian)


def test_decoded_size_is_bounded_before_decoding():
    """A few kilobytes of blank frames can claim gigabytes of pixels."""
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 200
    with pytest.raises(CannotTranscode, match=r"the decoded pixel data would take 2,576,901,735,000 bytes, more than the 2,147,483,648"):
        tc.transcode(ds, RLE)


def _patched_frame(ds: Dataset, marker: bytes, offset: int, value: bytes) -> Dataset:
    """``ds`` with the bytes at ``offset`` after ``marker`` in its first frame replaced."""
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))
    at = frames[0].index(marker) + offset
    frames[0] = frames[0][:at] + value + frames[0][at + len(value):]
    ds.PixelData = pydicom.encaps.encapsulate(frames)
    return ds


@pytest.mark.parametrize(("name", "marker", "offset", "value", "declared"), [
    # One flipped byte of a Knee image's SIZ (the mutation run, seed 40): Ysiz 512 -> 11,207,168;
    # openjpeg allocated 11.6 GB and took 20 s, or the kernel killed the process.
    ("JPEG2000.dcm", b"\xff\x4f\xff\x51", 12, b"\x00\xab\x02\x00", "11207168 rows, 256 columns and 1 samples"),
    ("SC_rgb_jpeg_dcmtk.dcm", b"\xff\xc0", 5, b"\xff\xf0", "65520 rows, 100 columns and 3 samples"),  # SOF0 height
    ("MR_small_jpeg_ls_lossless.dcm", b"\xff\xf7", 5, b"\x7f\x00", "32512 rows, 64 columns and 1 samples"),  # SOF55 height
])
def test_a_codestream_declaring_other_dimensions_is_refused_before_decoding(
        monkeypatch: pytest.MonkeyPatch, name: str, marker: bytes, offset: int, value: bytes, declared: str):
    """The decoders allocate what a codestream declares: before decoding, every frame's header
    must agree with Rows, Columns and SamplesPerPixel (which MAX_DECODED_BYTES bounds)."""
    ds = _patched_frame(pydicom.dcmread(get_testdata_file(name)), marker, offset, value)
    monkeypatch.setattr(tc, "_decoder_order", lambda *a: pytest.fail("a decoder was called"))
    expected = f"{ds.Rows}, {ds.Columns} and {ds.get('SamplesPerPixel', 1)}"
    with pytest.raises(CannotTranscode, match=f"frame 1 of the source .* declares {declared} per pixel, "
                                              f"the data set {expected}: the codestream or the data set is damaged"):
        tc.transcode(ds, ExplicitVRLittleEndian)


@pytest.mark.parametrize(("offset", "value"), [(16, 269), (20, 1024), (20, 0xFFFFFFFF)])  # XOsiz, YOsiz
def test_a_jpeg_2000_offset_beyond_its_size_is_refused_as_such(monkeypatch: pytest.MonkeyPatch, offset: int,
                                                               value: int):
    """XOsiz / YOsiz at or past Xsiz / Ysiz leave no image: said so, not as "-13 columns"."""
    import struct

    ds = _patched_frame(pydicom.dcmread(get_testdata_file("JPEG2000.dcm")), b"\xff\x4f\xff\x51", offset,
                        struct.pack(">I", value))
    monkeypatch.setattr(tc, "_decoder_order", lambda *a: pytest.fail("a decoder was called"))
    with pytest.raises(CannotTranscode, match=r"^frame 1 of the source \(.*\) declares an image offset at or beyond "
                                              r"its size \(no rows or no columns left\): the codestream is damaged$"):
        tc.transcode(ds, ExplicitVRLittleEndian)


def test_the_dimensions_of_a_jp2_wrapped_codestream_are_read_from_its_jp2c_box():
    """A JP2 file as a frame: the boxes are walked by their lengths (a box holding the bytes
    "jp2c" and a SIZ is not the codestream), 64-bit box lengths included."""
    import struct

    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    (frame,) = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)
    signature = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
    content = b"jp2c\xff\x4f\xff\x51" + struct.pack(">II", 9, 9) + b"\0"
    decoy = struct.pack(">I4s", 8 + len(content), b"xml ") + content
    header = ((1024, 256, 1), ds.BitsStored)  # what the SIZ says: the data set's dimensions and precision
    assert tc._j2k_header(frame) == header
    assert tc._j2k_header(signature + decoy + struct.pack(">I4s", 8 + len(frame), b"jp2c") + frame) == header
    assert tc._j2k_header(signature + struct.pack(">I4sQ", 1, b"jp2c", 16 + len(frame)) + frame) == header
    assert tc._j2k_header(signature + decoy) == tc._j2k_header(signature + struct.pack(">I4s", 0, b"xml ")) == (None, None)


def test_pydicoms_damaged_jpeg_2000_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch):
    """pydicom's JPEG2000-embedded-sequence-delimiter.dcm: a sequence delimiter inside the SIZ
    segment makes it declare 3,722,445,056 columns (Pillow refused it as a decompression
    bomb, openjpeg as an unreadable header): refused from the header."""
    ds = pydicom.dcmread(get_testdata_file("JPEG2000-embedded-sequence-delimiter.dcm"))
    monkeypatch.setattr(tc, "_decoder_order", lambda *a: pytest.fail("a decoder was called"))
    with pytest.raises(CannotTranscode, match="declares 1024 rows, 3722445056 columns and 1 samples per pixel, "
                                              "the data set 1024, 256 and 1"):
        tc.transcode(ds, ExplicitVRLittleEndian)


def test_a_high_throughput_jpeg_2000_source_is_decoded_and_checked_as_jpeg_2000_is(monkeypatch: pytest.MonkeyPatch):
    """HTJ2K (ISO/IEC 15444-15, 1.2.840.10008.1.2.4.201) sources decode through pydicom; their
    frames are JPEG 2000 codestreams and get the same checks before decoding (they used to get
    none: a damaged one failed as "pylibjpeg: RuntimeError raised", after the decoder's try)."""
    imagecodecs = pytest.importorskip("imagecodecs")
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    frame = imagecodecs.htj2k_encode(source.pixel_array)  # reversible: lossless
    ds = copy.deepcopy(source)
    ds.PixelData = pydicom.encaps.encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"
    ds = _reread(ds)
    out = tc.transcode(ds, ExplicitVRLittleEndian)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and out.PixelData == source.PixelData
    monkeypatch.setattr(tc, "_decoder_order", lambda *a: pytest.fail("a decoder was called"))
    tall = _patched_frame(copy.deepcopy(ds), b"\xff\x4f\xff\x51", 12, b"\x00\xab\x00\x00")  # Ysiz
    with pytest.raises(CannotTranscode, match=r"frame 1 of the source \(1.2.840.10008.1.2.4.201\) declares 11206656 rows, "
                                              "128 columns and 1 samples per pixel, the data set 128, 128 and 1"):
        tc.transcode(tall, ExplicitVRLittleEndian)
    ds.PixelData = pydicom.encaps.encapsulate([frame[: len(frame) * 7 // 10 // 2 * 2]])
    with pytest.raises(CannotTranscode, match="does not end with its end-of-image marker: the codestream is truncated"):
        tc.transcode(ds, ExplicitVRLittleEndian)


@pytest.mark.parametrize(("syntax", "shown"), [
    ("1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.110"),  # JPEG XL Lossless: standard, unknown to pydicom 3.0
    ("1.2.840.10008.1.2.8.1", "1.2.840.10008.1.2.8.1"),  # Deflated Image Frame Compression (Sup 244)
    ("1.2.826.0.1.3680043.2.1143.99", "(a UID that is not a known transfer syntax)"),  # a file's own value: not shown
])
def test_a_source_syntax_without_decoder_is_refused_by_name_when_standard(syntax: str, shown: str):
    """Standard syntaxes newer than pydicom's list are named (the message used to read "no pixel
    data decoder for source transfer syntax an unknown syntax"); any other UID is not shown."""
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    ds.file_meta.TransferSyntaxUID = syntax
    with pytest.raises(CannotTranscode) as raised:
        tc.transcode(ds, ExplicitVRLittleEndian)
    assert str(raised.value) == f"no pixel data decoder for source transfer syntax {shown}"


def test_a_file_in_a_syntax_newer_than_pydicom_passes_through_and_its_transcode_is_refused(tmp_path: Path):
    """JPEG XL (ISO/IEC 18181-1; unknown to pydicom 3.0): anonymized, the pixel data and the
    syntax stay as they are; a Transcode of it gets a cannot_transcode row naming the syntax."""
    from tests.pipeline_support import KEY
    from transforms import dicomio, request
    from transforms.beam import RunConfig, process_file

    path = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    raw, source = Path(path).read_bytes(), pydicom.dcmread(path)
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")  # after (0002,0000) and its group
    jxl = tmp_path / "in" / "jxl.dcm"
    jxl.parent.mkdir()
    jxl.write_bytes(dicomio.encode_file_meta(source.SOPClassUID, source.SOPInstanceUID, "1.2.840.10008.1.2.4.110")
                    + raw[meta_end:])
    rows = {}
    for name, body in (("plain", {}), ("transcode", {"Transcode": ExplicitVRLittleEndian})):
        cfg = RunConfig(plan=request.parse_anonymize(body), output_root=str(tmp_path / name), run_id="r",
                        key_id=KEY.key_id, key=KEY)
        rows[name], _ = process_file(str(jxl), jxl.stat().st_size, cfg, KEY)
    assert rows["plain"]["status"] == "written"
    out = pydicom.dcmread(rows["plain"]["output_uri"])
    assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.110" and out.PixelData == source.PixelData
    assert out.PatientIdentityRemoved == "YES"
    assert (rows["transcode"]["status"], rows["transcode"]["reason"], rows["transcode"]["detail"]) == (
        "failed", "cannot_transcode", "transcode: no pixel data decoder for source transfer syntax 1.2.840.10008.1.2.4.110")
    assert not any(p.is_file() for p in (tmp_path / "transcode").rglob("*"))  # nothing written, nothing partial


def test_bits_above_high_bit_are_not_dropped_silently():
    """12 bits stored in 16 with bit 15 set (a retired embedded overlay): a compressed target
    keeps 12 bits and the decoders mask the rest on both sides, so the check would not see it."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    pixels = (ds.pixel_array.astype(np.int32) & 0x0FFF).astype("<u2")
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.PixelData = pixels.tobytes()
    assert np.array_equal(tc.decode_pixels(_reread(tc.transcode(ds, RLE)))[0][0, :, :, 0], pixels)
    flagged = pixels.copy()
    flagged[0, :8] |= 0x8000
    ds.PixelData = flagged.tobytes()
    with pytest.raises(CannotTranscode, match="bits above HighBit 11 are set in the pixel data"):
        tc.transcode(ds, RLE)
    assert tc.transcode(ds, BIG_ENDIAN).file_meta.TransferSyntaxUID == BIG_ENDIAN  # native: every bit kept


def _grey(bits_allocated: int, bits_stored: int, pixels: np.ndarray, high_bit: int | None = None) -> Dataset:
    """A native unsigned MONOCHROME2 image (explicit VR little endian) holding ``pixels``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored = bits_allocated, bits_stored
    ds.HighBit = bits_stored - 1 if high_bit is None else high_bit
    ds.PixelData = pixels.astype(f"<u{bits_allocated // 8}").tobytes()
    return ds


@pytest.mark.parametrize("target", [RLE, JLS, J2K_LOSSLESS, JPEG_LOSSLESS[1]])
def test_bits_above_bits_stored_in_8_bit_data_are_not_dropped_silently(target: str):
    """The check used to look at 16- and 32-bit data only: 8 bits allocated, 7 stored, bit 7
    set in half the pixels went to every compressed target with those bits gone."""
    pixels = (np.arange(48 * 48).reshape(48, 48) % 128).astype(np.uint8)
    assert np.array_equal(tc.decode_pixels(_reread(tc.transcode(_grey(8, 7, pixels), target)))[0][0, :, :, 0], pixels)
    with pytest.raises(CannotTranscode, match=r"bits above HighBit 6 are set in the pixel data .*BitsStored \(7\)"):
        tc.transcode(_grey(8, 7, pixels | 0x80), target)


@pytest.mark.parametrize("target", [RLE, JLS, J2K_LOSSLESS])
def test_a_high_bit_above_bits_stored_minus_one_is_not_dropped_silently(target: str):
    """BitsStored 12 with HighBit 15 (values in the top 12 bits: old, non-conformant, real):
    every codec keeps bits 0-11, so the check looks at bits 12 and up, not above HighBit."""
    pixels = (np.arange(48 * 48).reshape(48, 48) % 1439 * 16).astype(np.uint16)
    with pytest.raises(CannotTranscode, match=r"bits at or above bit 12 \(HighBit 15\) are set"):
        tc.transcode(_grey(16, 12, pixels, high_bit=15), target)
    out = tc.transcode(_grey(16, 12, pixels // 16, high_bit=15), target)  # bits 0-11 only: kept
    assert np.array_equal(tc.decode_pixels(_reread(out))[0][0, :, :, 0], pixels // 16)


@pytest.mark.parametrize("target", [*JPEG_LOSSLESS, JPEG_LOSSY[1]])
def test_jpeg_refuses_32_bits_allocated(target: str):
    """PS3.5 8.2.1 allows JPEG only for 8 or 16 bits allocated; a 32-bit greyscale image with
    12 stored bits used to be written as JPEG with BitsAllocated 32."""
    pixels = (np.arange(48 * 48).reshape(48, 48) % 4096).astype(np.uint32)
    with pytest.raises(CannotTranscode, match=r"BitsAllocated must be 8 or 16 \(PS3.5 8.2.1\)$"):
        tc.transcode(_grey(32, 12, pixels), target)


@pytest.mark.parametrize("target", JPEG_LOSSY)
def test_lossy_jpeg_of_fewer_than_8_stored_bits_declares_8(target: str):
    """A 6-bit 0/63 checkerboard decodes with values up to about 67 after lossy JPEG: with
    BitsStored left at 6 a reader cuts the white squares to 0-3. The codestream's precision
    (8) is what the header must say, as for 12."""
    pixels = ((np.indices((64, 64)) // 4).sum(axis=0) % 2 * 63).astype(np.uint8)  # 4x4 squares
    out = _reread(tc.transcode(_grey(8, 6, pixels), target))
    assert (out.BitsStored, out.HighBit) == (8, 7)
    decoded = out.pixel_array.astype(int)
    assert decoded.max() > 63  # the overshoot this is about
    assert np.abs(decoded - pixels).max() <= 16


def _implicit_without(*missing: str) -> bytes:
    """MR_small (16-bit, PixelRepresentation 1) in implicit VR with SmallestImagePixelValue, an
    ambiguous US-or-SS element, and without the Image Pixel attributes named."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.SmallestImagePixelValue = 7
    for keyword in missing:
        delattr(ds, keyword)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _transcoded_row(tmp_path: Path, data: bytes, target: str) -> dict:
    from tests.pipeline_support import KEY
    from transforms import request
    from transforms.beam import RunConfig, process_file

    src = tmp_path / "in.dcm"
    src.write_bytes(data)
    cfg = RunConfig(plan=request.parse_anonymize({"Transcode": target}), output_root=str(tmp_path / "out"),
                    run_id="amb", key_id=KEY.key_id, key=KEY)
    return process_file(str(src), len(data), cfg, KEY)[0]


@pytest.mark.parametrize(("missing", "vr"), [((), "SS"), (("PixelRepresentation",), "US")])
def test_implicit_to_explicit_without_pixel_representation_writes_us_as_dcmtk(tmp_path: Path, missing, vr):
    """pydicom cannot decide US or SS without PixelRepresentation when PixelData is there (it
    raised AttributeError: an internal_error row, found by a long mutation run on Issue94.dcm);
    DCMTK, hence Orthanc 1.10.1 (checked), writes US. With PixelRepresentation 1: SS."""
    row = _transcoded_row(tmp_path, _implicit_without(*missing), ExplicitVRLittleEndian)
    assert (row["status"], row["reason"]) == ("written", None)
    out = pydicom.dcmread(row["output_uri"])
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (out._dict[0x00280106].VR, bytes(out._dict[0x00280106].value)) == (vr, b"\x07\x00")
    assert ("PixelRepresentation" in out) == (not missing)  # nothing added


def test_explicit_to_implicit_without_pixel_representation_is_refused(tmp_path: Path):
    """The other way: explicit VR said US or SS; implicit VR leaves it to the reader, which
    without PixelRepresentation cannot tell (pydicom raises on the element), so the output
    would be worse than its input. Found by the mutation run (Issue141.dcm, bytes dropped)."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    del ds.PixelRepresentation
    ds.add_new(0x00280106, "US", 7)  # SmallestImagePixelValue, its VR said
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    row = _transcoded_row(tmp_path, buffer.getvalue(), "1.2.840.10008.1.2")
    assert (row["status"], row["reason"], row["output_uri"]) == ("failed", "invalid_value", None)
    assert row["detail"].endswith("written in implicit VR, element (0028,0106) would read back as US or SS with "
                                  "nothing to tell which (no PixelRepresentation, say): readers fail on it")
    with_it = pydicom.dcmread(get_testdata_file("MR_small.dcm"))  # PixelRepresentation 1: SS, fine
    with_it.SmallestImagePixelValue = -7
    buffer = io.BytesIO()
    with_it.save_as(buffer, enforce_file_format=True)
    (tmp_path / "2").mkdir()
    row = _transcoded_row(tmp_path / "2", buffer.getvalue(), "1.2.840.10008.1.2")
    assert row["status"] == "written"
    assert pydicom.dcmread(row["output_uri"]).SmallestImagePixelValue == -7


@pytest.mark.parametrize("missing", ["PixelRepresentation", "BitsAllocated", "Rows"])
@pytest.mark.parametrize("target", ["1.2.840.10008.1.2.5", BIG_ENDIAN])
def test_decoding_an_image_without_its_pixel_module_names_what_is_missing(tmp_path: Path, missing: str, target: str):
    """Decoding needs the Image Pixel module: a file without one of its type 1 attributes is a
    failed transcode naming it (it was "AttributeError raised")."""
    row = _transcoded_row(tmp_path, _implicit_without(missing), target)
    assert (row["status"], row["reason"], row["output_uri"]) == ("failed", "cannot_transcode", None)
    assert row["detail"] == f"transcode: the image has no {missing} (type 1 in the Image Pixel module): its pixels cannot be decoded"


@pytest.mark.parametrize(("vr", "value"), [("LO", b"hello world "), ("OB", b"\xfe\xff\x00\xe0\x00\x00\x00\x00"),
                                           ("UN", b"\x01\x02\x03\x04\x05\x06\x07\x08")])
def test_a_source_image_sequence_with_another_vr_is_left_as_it_was(vr: str, value: bytes):
    """A lossy step meets SourceImageSequence stored as LO, OB or UN (bytes that are not
    items): the element keeps its bytes and gets no predecessor, and the file is written (it
    was an internal_error: the text or bytes were listed as items)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from transforms import dicomio as _dicomio
    from transforms.engine import apply as _apply
    from transforms.identity import Key as _Key
    from transforms.request import parse_modify as _parse_modify
    from transforms.transcode import transcode_for_plan

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds._dict[Tag(0x00082112)] = RawDataElement(Tag(0x00082112), vr, len(value), value, 0, False, True)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    plan = _parse_modify({"Transcode": J2K})
    key = _Key.from_bytes(b"t" * 32)
    source = _dicomio.read_dataset(buffer.getvalue())
    out = transcode_for_plan(plan, _apply(plan, source, key), key).dataset
    assert out.LossyImageCompression == "01"
    written = pydicom.dcmread(io.BytesIO(_dicomio.write_dataset(out)))
    raw = written.get_item(0x00082112)
    assert (raw.VR, raw.value) == (vr, value)


def test_a_lossy_step_drops_what_the_new_pixels_may_contradict():
    """As DCMTK does for Orthanc: the extreme and padding values go (PixelPaddingRangeLimit
    too, which PS3.3 does not allow without PixelPaddingValue), and an image without ImageType
    gets "DERIVED"; a lossless target keeps them all."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.ImageType
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
                    "LargestPixelValueInSeries", "PixelPaddingValue", "PixelPaddingRangeLimit"):
        setattr(ds, keyword, 7)
        ds[keyword].VR = "SS"
    lossy = tc.transcode(ds, J2K)
    assert [k for k in ("SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
                        "LargestPixelValueInSeries", "PixelPaddingValue", "PixelPaddingRangeLimit") if k in lossy] == []
    assert lossy.ImageType == "DERIVED"
    lossless = tc.transcode(ds, J2K_LOSSLESS)
    assert (lossless.SmallestImagePixelValue, lossless.PixelPaddingRangeLimit) == (7, 7)
    assert "ImageType" not in lossless
    assert ds.PixelPaddingValue == 7 and "ImageType" not in ds  # the source is untouched


def test_a_derivation_code_sequence_pydicom_cannot_read_is_not_dicom():
    """A lossy transcode appends the Lossy Compression code to DerivationCodeSequence; one
    whose item holds a SpecificCharacterSet with a NUL (pydicom raises on it, then returns
    the bytes as text under VR SQ) failed as cannot_transcode "TypeError raised". It is the
    file's ``not_dicom``, as the same sequence is everywhere else."""
    import struct

    from tests.pipeline_support import KEY
    from transforms import dicomio, engine, request
    from transforms.errors import InputError

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct.DerivationCodeSequence = [Dataset()]
    ct.DerivationCodeSequence[0].CodeValue = "X"
    buffer = io.BytesIO()
    ct.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    at = data.index(b"\x08\x00\x15\x92SQ")
    charset = b"\x08\x00\x05\x00CS\x04\x00AB\x00C"
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(charset)) + charset
    length = struct.unpack_from("<I", data, at + 8)[0]
    data = data[:at] + b"\x08\x00\x15\x92SQ\x00\x00" + struct.pack("<I", len(item)) + item + data[at + 12 + length:]
    plan = request.parse_modify({"Transcode": J2K, "Replace": {"PatientName": "x"}})
    new = engine.apply(plan, dicomio.read_dataset(data), KEY)
    with pytest.raises(InputError, match=r"^sequence \(0008,9215\) cannot be parsed$") as info:
        tc.transcode_for_plan(plan, new, KEY)
    assert info.value.reason == "not_dicom"


@pytest.mark.parametrize("target", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80",
                                    "1.2.840.10008.1.2.4.70"])
@pytest.mark.parametrize("flag", [None, "00"])
def test_a_lossy_source_decoded_to_a_lossless_syntax_stays_marked_lossy(target: str, flag: str | None) -> None:
    """A JPEG baseline file without LossyImageCompression: its syntax was the only record of the
    lossy step, and a lossless transcode dropped it (found by a review; Orthanc writes 01, as
    PS3.3 C.7.6.1.1.5 asks: once lossy, always 01). A lossless source is not marked."""
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    if flag is None:
        del ds.LossyImageCompression
    else:
        ds.LossyImageCompression = flag
    back = _reread(tc.transcode(ds, target))
    assert back.file_meta.TransferSyntaxUID == target
    assert back.LossyImageCompression == "01"
    lossless = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert "LossyImageCompression" not in _reread(tc.transcode(lossless, target))


@pytest.mark.parametrize("target", [RLE, JLS, J2K_LOSSLESS, JPEG_LOSSLESS[1]])
def test_signed_pixels_keep_their_sign_above_bits_stored_and_nothing_else(target: str):
    """Signed 12-in-16 pixels: bits above BitsStored that extend the sign (or are all 0) are the
    value itself and transcode exactly; bit 12 set in a block (an embedded overlay) was dropped
    unseen, since the decoders sign-extend both sides of the check alike (found by a review)."""
    values = np.tile(np.array([[-2048, -1, 0, 1], [2047, -300, 300, 5]], dtype="<i2"), (16, 8))  # 32 x 32
    ds = _grey(16, 12, values.view("<u2"))
    ds.PixelRepresentation = 1
    words = values.view("<u2").copy()
    words[0, 2] = 0x0800  # bit 11 set, upper bits 0: what some writers store for -2048
    ds.PixelData = words.tobytes()
    back = tc.decode_pixels(_reread(tc.transcode(ds, target)))[0][0, :, :, 0]
    expected = values.copy()
    expected[0, 2] = -2048
    assert np.array_equal(back, expected)
    for bad in (0x1064, 0xF064):  # bit 12 on a positive value; upper bits set beside a clear sign bit
        flagged = words.copy()
        flagged[1, 3] = bad
        ds.PixelData = flagged.tobytes()
        with pytest.raises(CannotTranscode, match="bits above HighBit 11 are set in the pixel data"):
            tc.transcode(ds, target)
