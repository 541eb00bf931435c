"""Change the transfer syntax of one dataset: the ``Transcode`` key of a request.

``transcode(ds, uid)`` returns a new dataset whose pixel data is encoded in the target transfer
syntax, with ``file_meta.TransferSyntaxUID`` set; ``ds`` itself is never modified.
``transcode_result`` also says what was done (lossy step, ratio, verified); ``validate_target``
checks a request's ``Transcode`` value up front; ``decode_pixels`` decodes with the same codecs.

* Lossless targets are proven lossless: unless ``verify=False``, the new pixel data is decoded
  again and compared with the source pixels; a difference raises
  :class:`~transforms.errors.CannotTranscode`, as does any codec error. A transcode never
  silently changes an image.
* Lossy targets (``LOSSY``) set LossyImageCompression ``01``, its ratio and method (appended to
  earlier lossy steps), ImageType value 1 ``DERIVED``, DerivationDescription and
  DerivationCodeSequence (113040), and drop the smallest/largest and padding values the new
  pixels may contradict, as DCMTK does for Orthanc. The caller gives such an instance a
  new SOPInstanceUID (``is_lossy(uid)`` / ``TranscodeResult.lossy``): this module never
  changes UIDs.
* Objects without pixel data (SR, PDF, ...) only change transfer syntax, even to an encapsulated
  one (the data set is then explicit VR little endian, as PS3.5 A.4 says), as Orthanc 1.10.1
  does for JPEG targets.
* Colour: JPEG lossy codestreams (.4.50/.4.51) in YCbCr are decoded to RGB, as DCMTK does; other
  sources keep their photometric interpretation (RGB, YBR_FULL, ...). JPEG lossy output of colour
  data is YBR_FULL_422 (4:2:2 subsampled, as DCMTK writes it), JPEG 2000 output of RGB is
  YBR_RCT (lossless) or YBR_ICT (lossy). PlanarConfiguration follows PS3.5: 1 for RLE
  (Annex G.2), 0 for the other encapsulated syntaxes, unchanged between native syntaxes.
* 1-bit (BitsAllocated 1) data only goes to the native syntaxes; it is refused for the others
  before any codec is called (python-gdcm aborts the process on it, so GDCM is never used for it).
* Failure messages name the target, the attribute keyword or the codec and what is allowed; they
  never quote a value from the file, and never chain the library's exception (pydicom and codec
  messages quote element values).

Codecs (the ``codecs`` extra): imagecodecs (libjpeg-turbo) encodes and decodes the JPEG
syntaxes, pyjpegls (CharLS) JPEG-LS, pylibjpeg + pylibjpeg-openjpeg (OpenJPEG) JPEG 2000,
pylibjpeg-rle RLE (pydicom's own RLE codec when it is absent). Pillow, python-gdcm and
pylibjpeg-libjpeg are used as fallback decoders when installed (GDCM never on 1-bit data). The
native syntaxes need nothing but pydicom. Without a codec, the transcode fails with
``CannotTranscode`` naming the missing extra.
"""

from __future__ import annotations

import copy
import dataclasses
import struct
from collections.abc import Iterator

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
try:  # JPEG frame headers (pydicom >= 3.0; private, so guarded)
    from pydicom.pixels.utils import _get_jpg_parameters
except ImportError:  # pragma: no cover - another pydicom: no JPEG header checks
    _get_jpg_parameters = None  # type: ignore[assignment]
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder, get_encoder
from pydicom.pixels.processing import convert_color_space
from pydicom.pixels.utils import compress as _pydicom_compress
from pydicom.pixels.utils import pack_bits
from pydicom.sequence import Sequence
from pydicom.pixels.encoders.base import ENCODING_PROFILES
from pydicom.uid import UID, AllTransferSyntaxes

from transforms import paths, rle_decoder
from transforms.dicomio import (
    NEWER_ENCAPSULATED_SYNTAXES,
    _character_set,
    is_valid_uid,
    keep_text_as_read,
    shallow_copy,
    unsigned_without_pixel_representation,
)
from transforms.errors import CannotTranscode, InputError, RequestError, is_work_failure
from transforms.values import _DS_RE  # PS3.5 Table 6.2-1, as replacements are checked

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEGLS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEGLS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"

#: Target transfer syntaxes this module can write, with their names.
SUPPORTED: dict[str, str] = {
    IMPLICIT_LE: "Implicit VR Little Endian",
    EXPLICIT_LE: "Explicit VR Little Endian",
    DEFLATED_LE: "Deflated Explicit VR Little Endian",
    EXPLICIT_BE: "Explicit VR Big Endian",
    RLE_LOSSLESS: "RLE Lossless",
    JPEG_BASELINE: "JPEG Baseline (Process 1), 8-bit lossy",
    JPEG_EXTENDED: "JPEG Extended (Process 2 & 4), 8/12-bit lossy",
    JPEG_LOSSLESS: "JPEG Lossless, Non-Hierarchical (Process 14)",
    JPEG_LOSSLESS_SV1: "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 SV1)",
    JPEGLS_LOSSLESS: "JPEG-LS Lossless",
    JPEGLS_NEAR_LOSSLESS: "JPEG-LS Lossy (Near-Lossless)",
    J2K_LOSSLESS: "JPEG 2000 Lossless Only",
    J2K: "JPEG 2000 (lossy)",
}

#: Supported targets that lose information (a new SOPInstanceUID is due).
LOSSY: frozenset[str] = frozenset({JPEG_BASELINE, JPEG_EXTENDED, JPEGLS_NEAR_LOSSLESS, J2K})

#: Sources whose pixels may have been through a lossy step: the lossy targets, JPEG 2000 Part 2
#: multi-component (4.93) and High-Throughput JPEG 2000 without "Lossless Only" (4.203), as
#: DCMTK counts them. Decoded to a lossless syntax, the file keeps LossyImageCompression 01.
LOSSY_SOURCES: frozenset[str] = LOSSY | {"1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203"}

#: Targets where only the data set encoding changes; the pixel bytes are not compressed.
NATIVE: frozenset[str] = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE, EXPLICIT_BE})

#: The 42 transfer syntaxes Orthanc 1.10.1 knows (Enumerations_TransferSyntaxes.impl.h), so a
#: request naming one we cannot write is told "known but unsupported", not "unknown".
ORTHANC_KNOWN: frozenset[str] = frozenset(
    [IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE, EXPLICIT_BE]
    + [f"1.2.840.10008.1.2.4.{n}" for n in range(50, 67)]
    + [JPEG_LOSSLESS_SV1, JPEGLS_LOSSLESS, JPEGLS_NEAR_LOSSLESS]
    + [f"1.2.840.10008.1.2.4.{n}" for n in range(90, 96)]
    + [f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)]
    + [RLE_LOSSLESS, "1.2.840.10008.1.2.6.1", "1.2.840.10008.1.2.6.2"]
)

# Codec parameters. Orthanc (DCMTK) uses IJG quality 90 and NEAR=2 by default. It cannot write
# lossy JPEG 2000, so there is no default to follow: 10:1 is a conservative ratio.
JPEG_QUALITY = 90
JLS_NEAR = 2
J2K_COMPRESSION_RATIO = 10.0
# A lossy round trip whose mean absolute error exceeds this share of the full scale
# (2**BitsStored) is treated as a codec failure, not as compression noise.
LOSSY_MAX_MEAN_ERROR = 0.05

_LOSSY_METHOD = {
    JPEG_BASELINE: "ISO_10918_1",
    JPEG_EXTENDED: "ISO_10918_1",
    JPEGLS_NEAR_LOSSLESS: "ISO_14495_1",
    J2K: "ISO_15444_1",
}
_JPEG = frozenset({JPEG_BASELINE, JPEG_EXTENDED, JPEG_LOSSLESS, JPEG_LOSSLESS_SV1})
_JPEG_LOSSY = frozenset({JPEG_BASELINE, JPEG_EXTENDED})
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Sources whose frames are JPEG 2000 codestreams: Part 1 and Part 2 (4.90 to 4.93) and
# High-Throughput JPEG 2000 (ISO/IEC 15444-15: 4.201 to 4.203), which pydicom
# decodes as sources (no target: Orthanc 1.10.1 does not know them).
_J2K_SOURCES = frozenset(
    [f"1.2.840.10008.1.2.4.{n}" for n in range(90, 94)] + [f"1.2.840.10008.1.2.4.{n}" for n in range(201, 204)]
)
# Syntaxes whose frames end with the FFD9 marker (EOI, or EOC for JPEG 2000): all but RLE.
_ENDS_WITH_EOI = frozenset(
    [f"1.2.840.10008.1.2.4.{n}" for n in range(50, 67)]
    + [JPEG_LOSSLESS_SV1, JPEGLS_LOSSLESS, JPEGLS_NEAR_LOSSLESS]
    + list(_J2K_SOURCES)
)
_EOI_SLACK = 16
#: The most decoded pixel data a transcode takes on (Rows x Columns x samples x frames x
#: BitsAllocated / 8): a 20 KB JPEG 2000 file of blank 8192 x 8192 frames decodes to gigabytes,
#: and encoders need several times that. Larger images get ``cannot_transcode``.
MAX_DECODED_BYTES = 2 << 30
_ENCODER_NAME = {
    RLE_LOSSLESS: "RLE (pylibjpeg-rle or pydicom)",
    JPEG_BASELINE: "libjpeg-turbo (imagecodecs)",
    JPEG_EXTENDED: "libjpeg-turbo (imagecodecs)",
    JPEG_LOSSLESS: "libjpeg-turbo (imagecodecs)",
    JPEG_LOSSLESS_SV1: "libjpeg-turbo (imagecodecs)",
    JPEGLS_LOSSLESS: "CharLS (pyjpegls)",
    JPEGLS_NEAR_LOSSLESS: "CharLS (pyjpegls)",
    J2K_LOSSLESS: "OpenJPEG (pylibjpeg-openjpeg)",
    J2K: "OpenJPEG (pylibjpeg-openjpeg)",
}
_PYDICOM_SYNTAXES = frozenset(str(u) for u in AllTransferSyntaxes)
_SWAP_WIDTH = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}
_PIXEL_DATA_TAG = 0x7FE00010
# Decoding plugins in order of preference (fastest correct first). GDCM comes last (it decodes
# some lossy RGB JPEG wrongly) and is never used on 1-bit data (it aborts the process).
_DECODERS_JPEG = ("imagecodecs", "pillow", "pylibjpeg", "gdcm")
_DECODERS_JPEGLS = ("pyjpegls", "pylibjpeg", "gdcm")
_DECODERS_OTHER = ("pylibjpeg", "pydicom", "pyjpegls", "pillow", "gdcm")
# RLE: pylibjpeg-rle's segment decoder (``rle_decoder``), then pydicom's pure-Python one. Not
# pylibjpeg-rle's frame decoder: it panics on padded segments (see ``rle_decoder``).
_DECODERS_RLE = (rle_decoder.PLUGIN, "pydicom", "gdcm")


@dataclasses.dataclass(frozen=True)
class TranscodeResult:
    """What ``transcode_result`` did.

    Attributes:
      dataset: the new dataset (``file_meta.TransferSyntaxUID == target_syntax``).
      source_syntax: the input's transfer syntax.
      target_syntax: the requested one.
      recoded: the pixel data was decoded and encoded again (not just re-wrapped).
      lossy: a lossy compression step was applied here: the instance needs a new SOPInstanceUID
        (False when nothing was re-encoded: no pixel data, or already in the target syntax).
      compression_ratio: uncompressed / compressed size of the new pixel data, when compressed.
      verified: the new pixel data was decoded and compared with the source pixels.
    """

    dataset: Dataset
    source_syntax: str
    target_syntax: str
    recoded: bool = False
    lossy: bool = False
    compression_ratio: float | None = None
    verified: bool = False


def validate_target(uid: object) -> str:
    """Return ``uid`` if it is a supported target transfer syntax.

    Raises:
      RequestError: naming ``Transcode`` and listing the supported UIDs; the message says when
        the UID is one Orthanc knows but this project cannot write.
    """
    allowed = ", ".join(SUPPORTED)
    if isinstance(uid, str) and uid in SUPPORTED:
        return uid
    if isinstance(uid, str) and uid in ORTHANC_KNOWN:
        raise RequestError(
            f"Transcode: transfer syntax {uid} ({UID(uid).name}) is known but cannot be "
            f"written here; supported: {allowed}"
        )
    if not isinstance(uid, str):
        raise RequestError(f"Transcode: expected a transfer syntax UID string; supported: {allowed}")
    shown = f" {uid}" if is_valid_uid(uid) else ""
    raise RequestError(f"Transcode: unknown transfer syntax UID{shown}; supported: {allowed}")


def is_lossy(uid: str) -> bool:
    """True when transcoding to ``uid`` loses information (a new SOPInstanceUID is due)."""
    return uid in LOSSY


def source_syntax(ds: Dataset) -> str:
    """Return the transfer syntax ``ds`` is encoded in.

    From ``file_meta.TransferSyntaxUID``, else from how pydicom read the data set (files without
    a meta header), else explicit VR little endian (a data set built in memory).
    """
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return str(uid)
    implicit, little = ds.original_encoding
    if little is False:
        return EXPLICIT_BE
    return IMPLICIT_LE if implicit else EXPLICIT_LE


def transcode(ds: Dataset, ts_uid: str, *, verify: bool = True) -> Dataset:
    """Return a copy of ``ds`` with its pixel data in transfer syntax ``ts_uid``.

    Args:
      ds: the source dataset; it is not modified.
      ts_uid: the target transfer syntax, one of ``SUPPORTED``.
      verify: decode the new pixel data and compare it with the source (exact for lossless
        targets, a sanity bound for lossy ones). On by default; costs one extra decode.

    Raises:
      RequestError: ``ts_uid`` is not a supported target.
      CannotTranscode: the pixel data cannot be written in ``ts_uid`` without loss (or at all);
        the message names the attribute or codec, never patient data.
    """
    return transcode_result(ds, ts_uid, verify=verify).dataset


def transcode_result(ds: Dataset, ts_uid: str, *, verify: bool = True) -> TranscodeResult:
    """Like ``transcode``, returning what was done along with the new dataset."""
    target = validate_target(ts_uid)
    source = source_syntax(ds)
    out = _copy(ds, deep=_is_little(source) != _is_little(target))
    _set(out.file_meta, "TransferSyntaxUID", UID(source))
    keyword = next((k for k in _PIXEL_KEYWORDS if k in out), None)
    try:
        if keyword is None or source == target:
            if source != target:
                _nested_pixels_native(out, source, target)
            _change_byte_order(out, source, target)
            return _done(out, source, target)
        _nested_pixels_native(out, source, target)
        if keyword != "PixelData":
            if target not in NATIVE:
                raise CannotTranscode(
                    f"{_target_text(target)}: {keyword} (floating point pixels) can only be "
                    "written uncompressed"
                )
            _change_byte_order(out, source, target)
            return _done(out, source, target)
        if source in NATIVE and target in NATIVE:
            return _native_to_native(out, source, target, verify)
        _check_decoded_size(out)
        return _recode(out, source, target, verify)
    except (CannotTranscode, InputError):  # ours, with their reason (InputError: the file's)
        raise
    except BaseException as exc:  # noqa: BLE001 - any codec failure is a failed transcode, not a crash
        if not is_work_failure(exc):
            raise
        # The library's text may quote element values (patient data): name the class only.
        raise CannotTranscode(f"{_target_text(target)}: {_describe(exc)}") from None


def decoded_size(ds: Dataset) -> int | None:
    """The bytes the pixel data of ``ds`` takes decoded, from its attributes (None when they do
    not say: the decoder then says what is missing)."""
    try:
        return (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
                * _frames(ds) * int(ds.BitsAllocated) // 8)
    except (AttributeError, TypeError, ValueError):
        return None


def _check_decoded_size(ds: Dataset) -> None:
    """Refuse before decoding an image whose pixels would exceed ``MAX_DECODED_BYTES``."""
    size = decoded_size(ds)
    if size is not None and size > MAX_DECODED_BYTES:
        raise CannotTranscode(
            f"the decoded pixel data would take {size:,} bytes, more than the {MAX_DECODED_BYTES:,} "
            "a transcode takes on"
        )


def _done(out: Dataset, source: str, target: str, **kwargs: object) -> TranscodeResult:
    _set(out.file_meta, "TransferSyntaxUID", UID(target))
    return TranscodeResult(out, source, target, **kwargs)  # type: ignore[arg-type]


def _target_text(target: str) -> str:
    return f"Transcode to {target} ({SUPPORTED[target]})"


def _describe(exc: BaseException) -> str:
    """The exception's class only: codec and pydicom messages quote element values."""
    return f"{type(exc).__name__} raised"


def _syntax_text(uid: str) -> str:
    """A transfer syntax UID for a message: only UIDs we know (a file's value could be PHI)."""
    if uid in ORTHANC_KNOWN or uid in _PYDICOM_SYNTAXES or uid in NEWER_ENCAPSULATED_SYNTAXES:
        return uid
    return "(a UID that is not a known transfer syntax)"


def decode_pixels(ds: Dataset) -> tuple[np.ndarray, str]:
    """Decode the pixel data of ``ds`` with the codecs ``transcode`` uses.

    Returns a (frames, rows, columns, samples) array and its photometric interpretation: no
    colour conversion, except JPEG lossy YCbCr codestreams, which come back as RGB.

    Raises:
      CannotTranscode: no pixel data, or no codec can decode it.
    """
    if "PixelData" not in ds:
        raise CannotTranscode("decode: the dataset has no PixelData")
    ts = source_syntax(ds)
    ds = _copy(ds, deep=False)  # decoding converts raw elements: in the copy, not the caller's
    _set(ds.file_meta, "TransferSyntaxUID", UID(ts))
    try:
        return _decode(ds, ts)
    except CannotTranscode:
        raise
    except BaseException as exc:  # noqa: BLE001 - a codec failure is a failed decode
        if not is_work_failure(exc):
            raise
        raise CannotTranscode(f"decode {_syntax_text(ts)}: {_describe(exc)}") from None


def _copy(ds: Dataset, *, deep: bool) -> Dataset:
    """A new dataset whose elements can be changed without touching ``ds``.

    Raw elements (immutable, as read) are shared, which keeps ``dicomio.write_dataset`` on its
    fast path; decoded elements are copied, since pydicom edits them in place (its writer fixes
    ambiguous VRs on the element objects). This module only ever *replaces* elements of the
    copy (``_set``). ``deep`` copies raw elements too, for byte swapping.
    """
    out = shallow_copy(ds)
    unsigned_without_pixel_representation(out)  # (as dicomio writes it: US, as DCMTK does)
    for tag, elem in list(out._dict.items()):
        if deep or not isinstance(elem, RawDataElement) or isinstance(elem.value, memoryview):
            # (codecs and pydicom's encapsulation helpers want bytes, not views of the file)
            out._dict[tag] = _deepcopy(elem)
    meta = getattr(out, "file_meta", None)
    if meta is None:
        out.file_meta = FileMetaDataset()
    else:
        for tag, elem in list(meta._dict.items()):
            meta._dict[tag] = copy.deepcopy(elem)
    return out


def _deepcopy(elem: "DataElement | RawDataElement") -> "DataElement | RawDataElement":
    """``copy.deepcopy`` of an element whose value may be a view of the file's bytes
    (``dicomio`` keeps large binary values as memoryviews, which cannot be copied)."""
    if isinstance(elem.value, memoryview):
        if isinstance(elem, RawDataElement):
            return elem._replace(value=bytes(elem.value))
        new = copy.copy(elem)
        new.value = bytes(elem.value)
        return new
    return copy.deepcopy(elem)


def _set(ds: Dataset, keyword: str, value: object) -> DataElement:
    """Set ``keyword`` on ``ds`` with a new element (an existing one may be shared)."""
    tag = tag_for_keyword(keyword)
    if tag in ds:
        del ds[tag]
    setattr(ds, keyword, value)
    return ds[tag]


# --- native <-> native -------------------------------------------------------------------------


def _is_little(uid: str) -> bool:
    return uid != EXPLICIT_BE


def _change_byte_order(out: Dataset, source: str, target: str) -> None:
    """Byte-swap every OW/OL/OF/OD/OV value when the byte order changes (pydicom does not)."""
    if _is_little(source) == _is_little(target):
        return
    keep_text_as_read(out)  # (converting every element would re-encode text)
    correct_ambiguous_vr(out, _is_little(source))
    _swap_values(out, from_big=not _is_little(source))


def _swap_values(ds: Dataset, *, from_big: bool) -> None:
    for elem in ds:  # iterating converts raw elements, read in the source byte order
        if elem.VR == "SQ":
            for item in elem.value or ():
                _swap_values(item, from_big=from_big)
            continue
        if elem.tag == _PIXEL_DATA_TAG:
            bits = int(ds.get("BitsAllocated", 8) or 8)
            if bits <= 8:
                value = elem.value
                if from_big and elem.VR == "OW" and isinstance(value, (bytes, bytearray)) and value \
                        and not len(value) % 2:
                    # 8-bit pixels a big endian file holds as OW (as DCMTK writes them) are 16-bit
                    # words in that byte order: back in pixel order as OB
                    elem.value = np.frombuffer(value, dtype="u2").byteswap().tobytes()
                elem.VR = "OB"  # bytes have no order; DCMTK writes OB here too
                continue
            width = bits // 8
        elif elem.VR in _SWAP_WIDTH:
            width = _SWAP_WIDTH[elem.VR]
        else:
            continue
        value = elem.value
        if not isinstance(value, (bytes, bytearray)) or not value:
            continue
        if elem.is_undefined_length or len(value) % width:
            raise CannotTranscode(
                f"element {elem.keyword or elem.tag} ({elem.VR}) cannot be byte-swapped: "
                f"length is not a multiple of {width}"
            )
        elem.value = np.frombuffer(value, dtype=f"u{width}").byteswap().tobytes()


def _native_to_native(out: Dataset, source: str, target: str, verify: bool) -> TranscodeResult:
    if _is_little(source) == _is_little(target):
        # Same pixel bytes, only the data set encoding changes: lossless by construction.
        return _done(out, source, target)
    _check_pixel_integers(out)
    before = _decode(out, source)[0] if verify else None
    _change_byte_order(out, source, target)
    _set(out.file_meta, "TransferSyntaxUID", UID(target))
    if before is not None:
        after = _decode(out, target)[0]
        if not np.array_equal(before, after):
            raise CannotTranscode(f"{_target_text(target)}: pixels differ after byte swapping")
    return _done(out, source, target, verified=before is not None)


# --- decoding ----------------------------------------------------------------------------------


def _frames(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _dtype(ds: Dataset) -> np.dtype:
    bits = int(ds.BitsAllocated)
    if bits == 1:
        return np.dtype("u1")
    kind = "i" if int(ds.get("PixelRepresentation", 0) or 0) == 1 else "u"
    return np.dtype(f"<{kind}{max(1, bits // 8)}")


def _as4d(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Shape as (frames, rows, columns, samples) with the dtype of BitsAllocated.

    Raises:
        CannotTranscode: the decoded values do not fit BitsAllocated (a codestream of a higher
            precision than the data set says): casting would cut them silently.
    """
    shape = (_frames(ds), int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1) or 1))
    dtype = _dtype(ds)
    arr = arr.reshape(shape)
    if arr.dtype != dtype and arr.size and np.issubdtype(arr.dtype, np.integer) and int(ds.BitsAllocated) > 1:
        limits = np.iinfo(dtype)
        if int(arr.min()) < limits.min or int(arr.max()) > limits.max:
            raise CannotTranscode(
                f"the decoded pixel values do not fit BitsAllocated {int(ds.BitsAllocated)} "
                "(the codestream has a higher precision than the data set says)"
            )
    return arr.astype(dtype, copy=False)


#: The Image Pixel module attributes pydicom's decoders read (``ds`` is always a copy here).
_DECODE_NEEDS = ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
                 "BitsStored", "PixelRepresentation")


#: Integer attributes of the Image Pixel module that decoding and encoding read.
_PIXEL_INTEGERS = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
                   "PixelRepresentation", "PlanarConfiguration", "NumberOfFrames")


def _check_pixel_integers(ds: Dataset) -> None:
    """Refuse a file whose pixel description holds a value that is not an integer (an IS
    NumberOfFrames of "1A"): named, as the file's fault (``invalid_value``), not as a codec's
    ("ValueError raised")."""
    for keyword in _PIXEL_INTEGERS:
        if keyword not in ds:
            continue
        try:
            value = ds[keyword].value
            if value not in (None, "", b""):
                int(value)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"{keyword} is not an integer: the pixels cannot be transcoded",
                             reason="invalid_value") from None


def _nested_pixels_native(out: Dataset, source: str, target: str) -> None:
    """Decode encapsulated Pixel Data nested in sequences (an Icon Image Sequence's, compressed
    like the image) to native, which every transfer syntax allows there (PS3.5 A.4: nested
    Pixel Data "may be encapsulated or native"). Left as it was, it would be written as it
    was: fragments in a native syntax, or one codec's codestream labelled as another's.
    Sequences are found without parsing the rest of the data set (the tag's bytes in their
    raw value, VR SQ or UN); only a sequence whose pixels change is put back, parsed, and in it
    only the nested pixel module changes: other elements keep the bytes read."""
    _nested_in(out, source, target, None)


#: (7FE0,0010) in little endian: nested encapsulated Pixel Data is only valid in (little endian)
#: encapsulated syntaxes.
_PIXEL_DATA_BYTES = b"\xe0\x7f\x10\x00"


def _nested_in(ds: Dataset, source: str, target: str, where: str | None) -> bool:
    """:func:`_nested_pixels_native` over the sequences of ``ds`` (a private copy, or an item
    parsed into one); whether something changed."""
    changed = False
    for tag in list(ds._dict):
        if tag == _PIXEL_DATA_TAG:
            continue
        elem = ds._dict[tag]
        if isinstance(elem, RawDataElement):
            value = elem.value
            if elem.VR not in ("SQ", "UN", None) or not isinstance(value, (bytes, bytearray, memoryview)) \
                    or _PIXEL_DATA_BYTES not in bytes(value):
                continue
            try:
                parsed = paths.convert_sequence(elem, tag, _character_set(ds), ds)
            except InputError:  # bytes that are not items: written as read, as before
                continue
            if parsed.VR != "SQ":
                continue
            if _items_native(parsed, source, target, where):
                ds._dict[tag] = parsed
                changed = True
        elif elem.VR == "SQ":
            changed |= _items_native(elem, source, target, where)
    return changed


def _items_native(sequence: DataElement, source: str, target: str, where: str | None) -> bool:
    where = where or sequence.keyword or str(sequence.tag)
    changed = False
    for item in sequence.value or ():
        changed |= _nested_in(item, source, target, where)
        if _PIXEL_DATA_TAG in item._dict and item[_PIXEL_DATA_TAG].is_undefined_length:
            _item_pixels_native(item, source, target, where)
            changed = True
    return changed


def _item_pixels_native(item: Dataset, source: str, target: str, where: str) -> None:
    sub = Dataset()
    sub.file_meta = FileMetaDataset()
    sub.file_meta.TransferSyntaxUID = UID(source)
    for keyword in (*_PIXEL_INTEGERS, "PhotometricInterpretation"):
        if keyword in item:
            sub[keyword] = copy.deepcopy(item[keyword])
    sub[_PIXEL_DATA_TAG] = copy.deepcopy(item[_PIXEL_DATA_TAG])
    try:
        _check_pixel_integers(sub)
        _check_decoded_size(sub)
        arr, pi = _decode(sub, source)
    except (CannotTranscode, InputError) as exc:
        raise CannotTranscode(f"{_target_text(target)}: the Pixel Data in {where} cannot be decoded "
                              f"({exc})") from None
    except BaseException as exc:  # noqa: BLE001 - a codec failure on the nested image
        if not is_work_failure(exc):
            raise
        raise CannotTranscode(f"{_target_text(target)}: the Pixel Data in {where} cannot be decoded "
                              f"({_describe(exc)})") from None
    _store_native(item, arr, pi)


def _require_pixel_module(ds: Dataset) -> None:
    """Refuse an image lacking what decoding reads (a damaged file: pydicom's decoders would
    raise AttributeError, which says nothing to the user)."""
    missing = next((k for k in _DECODE_NEEDS if k not in ds or ds[k].value in (None, "", b"")), None)
    if missing is not None:
        raise CannotTranscode(f"the image has no {missing} (type 1 in the Image Pixel module): its pixels cannot be decoded")


def _decode(ds: Dataset, ts: str) -> tuple[np.ndarray, str]:
    """Decode all frames of ``ds`` (encoded in ``ts``) without colour conversion.

    Returns the (frames, rows, columns, samples) array and its photometric interpretation. JPEG
    lossy codestreams in YCbCr come back as RGB, which is what their decoder (IJG in DCMTK)
    produces; everything else keeps its colour space.
    """
    _require_pixel_module(ds)
    if int(ds.BitsAllocated) not in (1, 8, 16, 32, 64):
        raise CannotTranscode("BitsAllocated must be 1, 8, 16, 32 or 64 to decode")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise CannotTranscode(
            f"no pixel data decoder for source transfer syntax {_syntax_text(ts)}"
        ) from None
    pi = str(ds.get("PhotometricInterpretation", ""))
    if decoder.is_native:
        arr, props = decoder.as_array(ds, raw=True)
        return _as4d(arr, ds), str(props.get("photometric_interpretation", pi))

    if ts in _ENDS_WITH_EOI:
        _check_complete_frames(ds, ts)
    failures: list[str] = []
    for plugin in _decoder_order(ts, decoder, int(ds.BitsAllocated)):
        try:
            if plugin == "imagecodecs":
                arr, pi_out = _decode_jpeg_imagecodecs(ds, ts)
            else:
                arr, props = decoder.as_array(ds, raw=True, decoding_plugin=plugin)
                pi_out = str(props.get("photometric_interpretation", pi))
            arr = _as4d(arr, ds)
        except BaseException as exc:  # noqa: BLE001 - try the next plugin
            if not is_work_failure(exc):
                raise
            failures.append(f"{plugin}: {_describe(exc)}")
            continue
        if ts in _JPEG_LOSSY and pi_out in ("YBR_FULL", "YBR_FULL_422") and arr.shape[-1] == 3:
            arr = convert_color_space(arr.copy(), "YBR_FULL", "RGB", per_frame=True)
            pi_out = "RGB"
        return arr, pi_out
    if not failures:
        raise CannotTranscode(
            f"no decoder installed for source transfer syntax {_syntax_text(ts)} "
            "(install the codecs extra)"
        )
    raise CannotTranscode(
        f"cannot decode source transfer syntax {_syntax_text(ts)}: {'; '.join(failures)}"
    )


def _check_complete_frames(ds: Dataset, ts: str) -> None:
    """Before any decoding, refuse a frame whose codestream

    - does not end with its end marker (FFD9: EOI in JPEG and JPEG-LS, EOC in JPEG 2000)
      within its last ``_EOI_SLACK`` bytes: a truncated stream. libjpeg-turbo only warns
      about one and fills the missing rows, so the result would be a different image;
    - declares other dimensions than the data set (Rows, Columns, SamplesPerPixel): the
      decoders allocate what the codestream declares, and one damaged byte of a JPEG 2000
      header asked for 11 GB (512 x 11,207,168 samples) where the data set said 512 x 512;
      :data:`MAX_DECODED_BYTES` holds only if the codestream agrees with the data set;
    - has more precise samples than BitsAllocated: the decoders cut its values to fit.
    """
    bits = int(ds.BitsAllocated)
    expected = (int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1) or 1))
    j2k = ts in _J2K_SOURCES
    for index, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=_frames(ds))):
        # Writers pad or leave a few stray bytes after the marker (0x00, 0xFF, "14 01" in the
        # samples); the marker cannot occur inside the coded data (FF is stuffed there).
        if frame.find(b"\xff\xd9", max(0, len(frame) - _EOI_SLACK)) < 0:
            raise CannotTranscode(
                f"frame {index + 1} of the source ({_syntax_text(ts)}) does not end with its "
                "end-of-image marker: the codestream is truncated"
            )
        declared, precision = _j2k_header(frame) if j2k else _jpeg_header(frame)
        if declared is not None and min(declared[:2]) <= 0:  # JPEG 2000: an offset at or past the size
            raise CannotTranscode(
                f"frame {index + 1} of the source ({_syntax_text(ts)}) declares an image offset at or "
                "beyond its size (no rows or no columns left): the codestream is damaged"
            )
        if declared is not None and declared != expected:
            raise CannotTranscode(
                f"frame {index + 1} of the source ({_syntax_text(ts)}) declares {declared[0]} rows, "
                f"{declared[1]} columns and {declared[2]} samples per pixel, the data set {expected[0]}, "
                f"{expected[1]} and {expected[2]}: the codestream or the data set is damaged"
            )
        if precision is not None and precision > bits:
            raise CannotTranscode(
                f"the source codestream has {precision}-bit samples but BitsAllocated is {bits}: "
                "decoding would cut its values"
            )


def _j2k_header(frame: bytes) -> tuple[tuple[int, int, int] | None, int | None]:
    """((rows, columns, components), precision of the first component) of a JPEG 2000
    codestream's SIZ segment (ISO/IEC 15444-1 A.5.1: Xsiz - XOsiz columns, Ysiz - YOsiz rows,
    Csiz components, Ssiz), a JP2 wrapper skipped (its boxes walked by their lengths, 64-bit ones
    included: pydicom's parser does not read those); (None, None) when it has no SIZ where the
    standard puts it (the decoder then says what it is)."""
    offset = 0
    if frame.startswith(b"\x00\x00\x00\x0cjP  "):  # a JP2 file: its codestream is the jp2c box
        while True:  # boxes (ISO/IEC 15444-1 I.4): length (1: 64-bit length after the type), type
            if offset + 8 > len(frame):
                return None, None
            length, kind = struct.unpack_from(">I4s", frame, offset)
            if kind == b"jp2c":
                offset += 16 if length == 1 else 8
                break
            if length == 1 and offset + 16 <= len(frame):
                length = struct.unpack_from(">Q", frame, offset + 8)[0]
            if length < 8:  # 0 (to the end of the file) before the codestream, or damaged
                return None, None
            offset += length
    head = frame[offset : offset + 43]
    if len(head) < 43 or head[:4] != b"\xff\x4f\xff\x51":  # SOC, then SIZ (A.3: always second)
        return None, None
    x, y, x0, y0 = struct.unpack_from(">IIII", head, 8)
    return (y - y0, x - x0, struct.unpack_from(">H", head, 40)[0]), (head[42] & 0x7F) + 1


def _jpeg_header(frame: bytes) -> tuple[tuple[int, int, int] | None, int | None]:
    """((rows, columns, components), precision) of a JPEG or JPEG-LS frame header (SOFn /
    SOF55) as pydicom's parser reads it; None for what it could not read (the decoder then
    says what it is)."""
    try:
        header = _get_jpg_parameters(frame) if _get_jpg_parameters is not None else {}
    except Exception:  # noqa: BLE001 - an unreadable header
        header = {}
    size = tuple(header.get(k) for k in ("height", "width", "components"))
    precision = header.get("precision")
    return (size if all(isinstance(v, int) for v in size) else None,  # type: ignore[return-value]
            precision if isinstance(precision, int) else None)


def _decoder_order(ts: str, decoder: object, bits_allocated: int) -> Iterator[str]:
    if ts == RLE_LOSSLESS:
        _add_rle_plugin(decoder)
    available = set(getattr(decoder, "available_plugins", ()))
    if ts in _JPEG and _have_imagecodecs():
        available.add("imagecodecs")
    if bits_allocated == 1:
        available.discard("gdcm")  # python-gdcm aborts the process on 1-bit data
    if ts in _JPEG:
        order = _DECODERS_JPEG
    elif ts in (JPEGLS_LOSSLESS, JPEGLS_NEAR_LOSSLESS):
        order = _DECODERS_JPEGLS
    elif ts == RLE_LOSSLESS:
        order = _DECODERS_RLE
    else:
        order = _DECODERS_OTHER
    for plugin in order:
        if plugin in available:
            yield plugin


def _add_rle_plugin(decoder: object) -> None:
    """Register ``rle_decoder`` on pydicom's RLE decoder (once per process)."""
    if rle_decoder.PLUGIN in getattr(decoder, "available_plugins", ()):
        return
    try:
        decoder.add_plugin(rle_decoder.PLUGIN, ("transforms.rle_decoder", "decode_frame"))  # type: ignore[attr-defined]
    except ValueError:  # registered already, unavailable (no pylibjpeg-rle)
        pass


def _have_imagecodecs() -> bool:
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(imagecodecs.JPEG8.available)


def _decode_jpeg_imagecodecs(ds: Dataset, ts: str) -> tuple[np.ndarray, str]:
    """Decode JPEG frames with libjpeg-turbo (8/12-bit lossy, 2-16 bit lossless).

    Lossy YCbCr colour comes back as RGB, converted by libjpeg as DCMTK's IJG code does; other
    colour data is returned as stored, as the photometric interpretation says it is.
    """
    import imagecodecs

    pi = str(ds.get("PhotometricInterpretation", ""))
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    space = out_space = None
    if samples == 3:
        space = out_space = "YCbCr" if pi.startswith("YBR") else "RGB"
        if ts in _JPEG_LOSSY and pi.startswith("YBR"):
            out_space, pi = "RGB", "RGB"
    frames = []
    for fragment in generate_frames(ds.PixelData, number_of_frames=_frames(ds)):
        if space is None:
            frames.append(imagecodecs.jpeg8_decode(fragment))
        else:
            frames.append(
                imagecodecs.jpeg8_decode(fragment, colorspace=space, outcolorspace=out_space)
            )
    arr = np.stack(frames)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        # The codec returns the two's complement bit pattern of BitsStored bits: sign-extend.
        signed = _dtype(ds)
        shift = signed.itemsize * 8 - int(ds.BitsStored)
        arr = (arr.astype(signed) << shift) >> shift
    return arr, ("YBR_FULL" if pi == "YBR_FULL_422" else pi)


# --- encoding ----------------------------------------------------------------------------------


def _recode(out: Dataset, source: str, target: str, verify: bool) -> TranscodeResult:
    _check_pixel_integers(out)
    _require_pixel_module(out)
    if int(out.BitsAllocated) == 1 and target not in NATIVE:
        raise CannotTranscode(
            f"{_target_text(target)}: BitsAllocated 1 (bit-packed) pixel data can only be "
            f"written in {', '.join(sorted(NATIVE))}"
        )
    arr, pi = _decode(out, source)
    if source not in NATIVE and arr.size and arr.dtype.kind in "iu":
        # A codestream of more bits than BitsStored: no target keeps them (native targets are
        # read back through BitsStored), so say so rather than "round trip differs" (a review)
        _check_decoded_range(out, arr, target)
    if source in LOSSY_SOURCES and target not in LOSSY:
        # PS3.3 C.7.6.1.1.5: once lossy, always 01; the syntax was the only record of it when
        # the attribute is missing (Orthanc/DCMTK write 01 too; found by a review).
        _set(out, "LossyImageCompression", "01")
    if target in NATIVE:
        _store_native(out, arr, pi)
        if not _is_little(target):
            _set(out.file_meta, "TransferSyntaxUID", UID(EXPLICIT_LE))
            _change_byte_order(out, EXPLICIT_LE, target)
        _set(out.file_meta, "TransferSyntaxUID", UID(target))
        if verify:
            _check(out, target, arr)
        return _done(out, source, target, recoded=True, verified=verify)

    _check_encodable(out, arr, pi, target)
    _check_high_bits(out, source, target)
    if not _is_little(source):
        # Every compressed syntax is little endian: the other OW/OL/OF/OD/OV values (palette
        # LUTs, overlays, an icon's pixels) change byte order too; the pixels are decoded.
        _change_byte_order(out, source, EXPLICIT_LE)
    try:
        if target in _JPEG:
            encoded, pi_out, arr = _encode_jpeg(out, arr, pi, target)
            _store_encapsulated(out, encoded, pi_out, target)
        else:
            _encode_pydicom(out, arr, _encoded_pi(pi, target), target)
    except CannotTranscode:
        raise
    except BaseException as exc:  # noqa: BLE001 - the codec refused this image
        if not is_work_failure(exc):
            raise
        raise CannotTranscode(
            f"{_target_text(target)}: the {_ENCODER_NAME[target]} encoder failed "
            f"({_describe(exc)})"
        ) from None
    ratio = _compression_ratio(out)
    lossy = target in LOSSY
    if lossy:
        _mark_lossy(out, target, ratio)
    if verify:
        _check(out, target, arr)
    return _done(
        out, source, target, recoded=True, lossy=lossy, compression_ratio=ratio, verified=verify
    )


def _check_high_bits(out: Dataset, source: str, target: str) -> None:
    """Refuse native pixel data with bits set at or above BitsStored (the retired embedded
    overlays above HighBit, stray bits, or a HighBit above BitsStored - 1): every compressed
    target keeps bits 0 to BitsStored - 1 only, and the decoders mask the rest on both sides of
    the check, so the loss would go unseen. Signed data may hold its sign there: bits above
    BitsStored that are all 1 beside a set sign bit (or all 0) are the value itself (the
    decoders sign-extend them alike); any other pattern was dropped unseen (found by a review)."""
    if source not in NATIVE:
        return
    signed = int(out.get("PixelRepresentation", 0) or 0) != 0
    bits, stored = int(out.BitsAllocated), int(out.get("BitsStored", out.BitsAllocated) or out.BitsAllocated)
    if bits not in (8, 16, 32) or stored >= bits:
        return
    value = out.PixelData
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) % (bits // 8):
        return
    order = "<" if _is_little(source) else ">"
    words = np.frombuffer(value, dtype=f"{order}u{bits // 8}")
    if words.size and int(np.bitwise_or.reduce(words)) >> stored:
        if signed:
            upper = words >> stored
            extended = (upper == (1 << (bits - stored)) - 1) & ((words >> (stored - 1)) & 1 == 1)
            if bool(np.all((upper == 0) | extended)):
                return
        high = int(out.get("HighBit", stored - 1) or stored - 1)
        where = f"above HighBit {high}" if high == stored - 1 else f"at or above bit {stored} (HighBit {high})"
        raise CannotTranscode(
            f"{_target_text(target)}: bits {where} are set in the pixel data (an embedded "
            f"overlay?); the target keeps BitsStored ({stored}) bits only"
        )


def _stored_range(out: Dataset) -> tuple[int, int, int]:
    """``(BitsStored, lowest, highest)`` value the data set's pixel cells can hold."""
    bits_stored = int(out.BitsStored)
    if int(out.get("PixelRepresentation", 0) or 0) == 1:
        return bits_stored, -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return bits_stored, 0, (1 << bits_stored) - 1


def _check_decoded_range(out: Dataset, arr: np.ndarray, target: str) -> None:
    bits_stored, low, high = _stored_range(out)
    if int(arr.min()) < low or int(arr.max()) > high:
        raise CannotTranscode(
            f"{_target_text(target)}: pixel values lie outside the range BitsStored ({bits_stored}) allows "
            "(the source's codestream holds more bits than its header says)"
        )


def _check_encodable(out: Dataset, arr: np.ndarray, pi: str, target: str) -> None:
    signed = int(out.get("PixelRepresentation", 0) or 0) == 1
    bits_stored = int(out.BitsStored)
    text = _target_text(target)
    if target in LOSSY and pi == "PALETTE COLOR":
        raise CannotTranscode(f"{text}: PALETTE COLOR indices cannot be compressed lossily")
    if target in _JPEG_LOSSY:
        if signed:
            raise CannotTranscode(f"{text}: JPEG lossy cannot hold signed pixel data")
        bits_allocated = int(out.BitsAllocated)
        if (target == JPEG_BASELINE or arr.shape[-1] == 3) and bits_allocated != 8:
            raise CannotTranscode(
                f"{text}: BitsAllocated must be 8"
                + ("" if target == JPEG_BASELINE else " (16 with BitsStored <= 12 for greyscale)")
            )
        if bits_stored > 12:
            raise CannotTranscode(f"{text}: BitsStored must be at most 12")
    if target in _JPEG and bits_stored > 16:
        raise CannotTranscode(f"{text}: BitsStored must be at most 16")
    if target in _JPEG and int(out.BitsAllocated) not in (8, 16):
        raise CannotTranscode(f"{text}: BitsAllocated must be 8 or 16 (PS3.5 8.2.1)")
    if arr.size and arr.dtype.kind in "iu":  # every codec keeps BitsStored bits (found by a review:
        # the others failed as "ValueError raised", the cause unsaid)
        _, low, high = _stored_range(out)
        lowest, highest = int(arr.min()), int(arr.max())
        if lowest < low or highest > high:
            raise CannotTranscode(f"{text}: pixel values lie outside the range BitsStored ({bits_stored}) allows")
        if target == JPEGLS_NEAR_LOSSLESS and signed and (lowest < low + JLS_NEAR or highest > high - JLS_NEAR):
            # pydicom's check (it failed as "ValueError raised": found by a review)
            raise CannotTranscode(
                f"{text}: signed pixel values must lie within {low + JLS_NEAR}..{high - JLS_NEAR} (JPEG-LS "
                f"does not record the sign, and an error of up to NEAR={JLS_NEAR} would flip it at the range's ends)"
            )
    if target in (JPEG_LOSSLESS, JPEG_LOSSLESS_SV1) and pi.startswith("YBR"):
        # libjpeg-turbo marks 3-sample lossless data as RGB (Adobe APP14) or corrupts it when
        # told it is YCbCr; readers would then show the YCbCr samples as RGB.
        raise CannotTranscode(
            f"{text}: YBR colour data cannot be stored losslessly by the JPEG encoder "
            "(PhotometricInterpretation allowed: RGB, MONOCHROME1, MONOCHROME2, PALETTE COLOR); "
            "use JPEG-LS, JPEG 2000 or RLE"
        )
    if target in (J2K_LOSSLESS, J2K):
        if min(int(out.Rows), int(out.Columns)) < 32:
            raise CannotTranscode(
                f"{text}: Rows and Columns must be at least 32 for the OpenJPEG encoder "
                "(6 resolution levels)"
            )
        if bits_stored > 24:
            raise CannotTranscode(f"{text}: BitsStored must be at most 24 for OpenJPEG")
    if target not in _JPEG:  # libjpeg-turbo's limits are checked above
        _check_profile(out, _encoded_pi(pi, target), target)


def _encoded_pi(pi: str, target: str) -> str:
    if pi == "RGB" and target == J2K_LOSSLESS:
        return "YBR_RCT"
    if pi == "RGB" and target == J2K:
        return "YBR_ICT"
    return pi


def _check_profile(out: Dataset, pi: str, target: str) -> None:
    """PS3.5 8.2 pixel module constraints as pydicom encodes them (its own error quotes values)."""
    found = (
        pi,
        int(out.get("SamplesPerPixel", 1) or 1),
        int(out.get("PixelRepresentation", 0) or 0),
        int(out.BitsAllocated),
        int(out.BitsStored),
    )
    allowed = []
    for p_pi, spp, px_repr, bits_a, bits_s in ENCODING_PROFILES[UID(target)]:
        if (found[0], found[1]) == (p_pi, spp) and found[2] in px_repr and found[3] in bits_a and (
            found[4] in bits_s
        ):
            return
        stored = list(bits_s)
        allowed.append(
            f"{p_pi}/{spp} sample(s), BitsAllocated {'|'.join(map(str, bits_a))}, BitsStored "
            f"{stored[0]}-{stored[-1]}, PixelRepresentation {'|'.join(map(str, px_repr))}"
        )
    raise CannotTranscode(
        f"{_target_text(target)}: the image pixel module is not allowed in this syntax; "
        f"allowed: {'; '.join(allowed)}"
    )


def _pydicom_shape(arr: np.ndarray) -> np.ndarray:
    frames, rows, cols, samples = arr.shape
    shape: tuple[int, ...] = (rows, cols) if frames == 1 else (frames, rows, cols)
    return arr.reshape(shape + ((samples,) if samples > 1 else ()))


def _encode_pydicom(out: Dataset, arr: np.ndarray, pi: str, target: str) -> None:
    """RLE, JPEG-LS and JPEG 2000 through pydicom's encoders (from the array, never raw bytes)."""
    encoder = get_encoder(target)
    plugins = encoder.available_plugins
    preferred = {RLE_LOSSLESS: ("pylibjpeg", "pydicom")}.get(target, ("pyjpegls", "pylibjpeg"))
    plugin = next((p for p in preferred if p in plugins), None)
    if plugin is None:
        raise CannotTranscode(
            f"{_target_text(target)}: no encoder installed (install the codecs extra)"
        )
    _set(out, "PhotometricInterpretation", pi)
    if arr.shape[-1] > 1:
        _set(out, "PlanarConfiguration", 0)  # the array is colour-by-pixel
    kwargs: dict[str, object] = {}
    if target == JPEGLS_NEAR_LOSSLESS:
        kwargs["jls_error"] = JLS_NEAR
    if target == J2K:
        kwargs["j2k_cr"] = [J2K_COMPRESSION_RATIO]
    _drop_offset_tables(out)
    del out[_PIXEL_DATA_TAG]  # compress() would assign into the (shared) element
    del out.file_meta[0x00020010]
    _pydicom_compress(
        out,
        target,
        arr=_pydicom_shape(arr),
        encoding_plugin=plugin,
        generate_instance_uid=False,
        **kwargs,
    )
    if arr.shape[-1] > 1 and target == RLE_LOSSLESS:
        _set(out, "PlanarConfiguration", 1)  # PS3.5 G.2: RLE segments are colour planes


def _encode_jpeg(
    out: Dataset, arr: np.ndarray, pi: str, target: str
) -> tuple[list[bytes], str, np.ndarray]:
    """Encode with libjpeg-turbo; returns the frames, their photometric interpretation and the
    array they encode (colour data may be converted to RGB for lossy JPEG)."""
    try:
        import imagecodecs
    except ImportError as exc:
        raise CannotTranscode(
            f"{_target_text(target)}: imagecodecs is not installed (install the codecs extra)"
        ) from exc
    bits_stored = int(out.BitsStored)
    samples = arr.shape[-1]
    frames: list[bytes] = []
    if target in _JPEG_LOSSY:
        precision = 8 if int(out.BitsAllocated) == 8 else 12
        if samples == 3 and pi != "RGB":
            arr = convert_color_space(arr.copy(), "YBR_FULL", "RGB", per_frame=True)
        for frame in arr:
            data = frame[..., 0] if samples == 1 else frame
            frames.append(
                imagecodecs.jpeg8_encode(
                    np.ascontiguousarray(data, dtype=np.uint8 if precision == 8 else np.uint16),
                    level=JPEG_QUALITY,
                    subsampling="422" if samples == 3 else None,
                    bitspersample=precision,
                )
            )
        if bits_stored != precision:
            # The codestream's precision: its lossy values can overshoot a smaller BitsStored
            # (a 6-bit 0/63 checkerboard decodes up to 67, which a 6-bit reader cuts to 3).
            _set(out, "BitsStored", precision)
            _set(out, "HighBit", precision - 1)
        return frames, ("YBR_FULL_422" if samples == 3 else pi), arr

    # Lossless: the codec sees unsigned integers of BitsStored bits (two's complement for
    # signed data, PS3.5 8.2.1), at least 2 bits (JPEG's minimum precision).
    precision = max(2, bits_stored)
    mask = (1 << bits_stored) - 1
    unsigned = np.dtype(f"u{arr.dtype.itemsize}")
    predictor = 1 if target == JPEG_LOSSLESS_SV1 else 6  # DCMTK's defaults for .70 / .57
    for frame in arr:
        data = frame.view(unsigned) & unsigned.type(mask)
        data = data[..., 0] if samples == 1 else data
        frames.append(
            imagecodecs.jpeg8_encode(
                np.ascontiguousarray(data, dtype=np.uint8 if precision <= 8 else np.uint16),
                lossless=True,
                predictor=predictor,
                bitspersample=precision,
            )
        )
    return frames, pi, arr


def _store_encapsulated(out: Dataset, frames: list[bytes], pi: str, target: str) -> None:
    _drop_offset_tables(out)
    if sum(len(f) + 8 for f in frames[:-1]) > 2**32 - 1:  # offsets no longer fit the BOT
        data, offsets, lengths = encapsulate_extended(frames)
        _set(out, "ExtendedOffsetTable", offsets)
        _set(out, "ExtendedOffsetTableLengths", lengths)
    else:
        data = encapsulate(frames)
    elem = _set(out, "PixelData", data)
    elem.VR = "OB"
    elem.is_undefined_length = True
    _set(out, "PhotometricInterpretation", pi)
    if int(out.get("SamplesPerPixel", 1) or 1) > 1:
        _set(out, "PlanarConfiguration", 0)
    _set(out.file_meta, "TransferSyntaxUID", UID(target))


def _store_native(out: Dataset, arr: np.ndarray, pi: str) -> None:
    _drop_offset_tables(out)
    if int(out.BitsAllocated) == 1:
        data = pack_bits(arr.ravel())
    else:
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    if len(data) % 2:
        data += b"\x00"
    elem = _set(out, "PixelData", data)
    elem.VR = "OB" if int(out.BitsAllocated) <= 8 else "OW"
    elem.is_undefined_length = False
    _set(out, "PhotometricInterpretation", pi)
    if arr.shape[-1] > 1:
        _set(out, "PlanarConfiguration", 0)


def _drop_offset_tables(out: Dataset) -> None:
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in out:
            del out[keyword]


def _compression_ratio(out: Dataset) -> float:
    """Uncompressed / compressed size, the uncompressed size counted at BitsStored bits per
    sample as DCMTK counts it for Orthanc (a 12-bit image: 6.8031 where 16 allocated bits would
    give 9.0709, measured against Orthanc 1.10.1)."""
    samples = int(out.get("SamplesPerPixel", 1) or 1)
    bits = int(out.get("BitsStored", None) or out.BitsAllocated)
    size = _frames(out) * int(out.Rows) * int(out.Columns) * samples * bits / 8
    compressed = sum(len(f) for f in generate_frames(out.PixelData, number_of_frames=_frames(out)))
    return size / max(1, compressed)


#: What a lossy step makes untrue about the stored values, removed as DCMTK removes it for
#: Orthanc (which keeps a monochrome image's PixelPaddingRangeLimit without its
#: PixelPaddingValue, where PS3.3 C.7.5.1.1.2 requires both or neither: we remove both).
_STALE_AFTER_LOSSY = ("SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
                      "LargestPixelValueInSeries", "PixelPaddingValue", "PixelPaddingRangeLimit")


_DERIVATION_CODE_SEQUENCE = 0x00089215


def _mark_lossy(out: Dataset, target: str, ratio: float) -> None:
    """Record a lossy step (PS3.3 C.7.6.1.1.5) the way DCMTK does for Orthanc: ImageType value
    1 DERIVED (the whole value when there was none), the extreme and padding values dropped."""
    ratio_text = f"{ratio:.5g}"
    method = _LOSSY_METHOD[target]
    try:
        ratios = list(_values(out, "LossyImageCompressionRatio"))
        methods = list(_values(out, "LossyImageCompressionMethod"))
        if not all(_DS_RE.match(text) for text in ratios):
            raise ValueError("not a decimal string")  # (pydicom reads "abc" as text, refuses to write it)
    except (ValueError, TypeError, OverflowError):
        # an earlier step's values unreadable: the new step is recorded alone, as where they do
        # not pair up (it failed as the encoder's error: found by a review)
        ratios, methods = [], []
    if len(ratios) != len(methods) or out.get("LossyImageCompression") != "01":
        ratios, methods = [], []
    _set(out, "LossyImageCompression", "01")
    _set(out, "LossyImageCompressionRatio", [*ratios, ratio_text] if ratios else ratio_text)
    _set(out, "LossyImageCompressionMethod", [*methods, method] if methods else method)
    image_type = list(_values(out, "ImageType"))
    _set(out, "ImageType", ["DERIVED", *image_type[1:]] if image_type else "DERIVED")
    for keyword in _STALE_AFTER_LOSSY:  # the new pixel values may lie outside them
        if keyword in out:
            del out[keyword]
    description = {
        JPEG_BASELINE: f"Lossy compression with JPEG baseline, IJG quality factor {JPEG_QUALITY}",
        JPEG_EXTENDED: (
            f"Lossy compression with JPEG extended sequential {int(out.BitsStored)} bit, "
            f"IJG quality factor {JPEG_QUALITY}"
        ),
        JPEGLS_NEAR_LOSSLESS: "near lossless JPEG-LS compression",
        J2K: "Lossy compression with JPEG 2000",
    }[target]
    if target == JPEGLS_NEAR_LOSSLESS:
        text = f"{description}, factor {ratio_text} (NEAR={JLS_NEAR})"
    else:
        text = f"{description}, compression ratio {ratio_text}"
    old = str(out.get("DerivationDescription", "") or "")
    if old:
        text = f"{text} [{old}]"
        if len(text) > 1024:  # ST holds 1024 characters
            text = text[:1020] + "...]"
    _set(out, "DerivationDescription", text)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
        "113040",
        "DCM",
        "Lossy Compression",
    )
    raw = out._dict.get(_DERIVATION_CODE_SEQUENCE)
    if type(raw) is RawDataElement:  # (not_dicom: bytes pydicom cannot read as items)
        out._dict[_DERIVATION_CODE_SEQUENCE] = paths.convert_sequence(raw, _DERIVATION_CODE_SEQUENCE,
                                                                      _character_set(out), out)
    items = list(out.get("DerivationCodeSequence", None) or [])
    if not any(getattr(i, "CodeValue", None) == "113040" for i in items):
        _set(out, "DerivationCodeSequence", Sequence([*items, code]))


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


# --- verification ------------------------------------------------------------------------------


def _check(out: Dataset, target: str, expected: np.ndarray) -> None:
    """Decode the new pixel data and compare it with what was encoded."""
    got, _ = _decode(out, target)
    text = _target_text(target)
    if got.shape != expected.shape:
        raise CannotTranscode(f"{text}: the decoded shape differs from the source")
    if target not in LOSSY:
        if not np.array_equal(got, expected):
            count = int(np.count_nonzero(got != expected))
            raise CannotTranscode(f"{text}: round trip differs in {count} samples")
        return
    error = np.abs(got.astype(np.int64) - expected.astype(np.int64))
    if target == JPEGLS_NEAR_LOSSLESS and int(error.max()) > JLS_NEAR:
        raise CannotTranscode(f"{text}: round-trip error {int(error.max())} exceeds NEAR={JLS_NEAR}")
    scale = float(2 ** int(out.BitsStored))
    if float(error.mean()) > LOSSY_MAX_MEAN_ERROR * scale:
        raise CannotTranscode(
            f"{text}: round-trip mean error {float(error.mean()):.1f} exceeds "
            f"{LOSSY_MAX_MEAN_ERROR:.0%} of the {int(out.BitsStored)}-bit range"
        )


__all__ = [
    "LOSSY",
    "decode_pixels",
    "NATIVE",
    "ORTHANC_KNOWN",
    "SUPPORTED",
    "TranscodeResult",
    "decoded_size",
    "is_lossy",
    "source_syntax",
    "transcode",
    "transcode_result",
    "validate_target",
]


_SOP_INSTANCE_UID = 0x00080018


def transcode_for_plan(plan: object, ds: Dataset, key: object) -> TranscodeResult:
    """Apply a request's ``Transcode`` to the engine's output (``plan.transcode`` must be set).

    A lossy re-encoding makes a new image, so it gets a new SOPInstanceUID (as Orthanc's
    instance route does), derived from the key and the instance's current UID, unless the
    body kept or replaced SOPInstanceUID (both need ``Force``): then the caller asked for that
    identity and it stays. The meta header follows when the file is written. A new image names
    the one it was made from (its current, already de-identified or modified UID) in a new
    SourceImageSequence item with purpose 121320 "Uncompressed predecessor", after the items it
    had, as DCMTK does for Orthanc (PS3.3 C.7.6.1.1.5, C.7.6.1.2).
    """
    result = transcode_result(ds, plan.transcode)  # type: ignore[attr-defined]
    if not result.lossy:
        return result
    kept = getattr(plan, "keep", frozenset()) | getattr(plan, "forced_uids", frozenset())
    if _SOP_INSTANCE_UID in kept:
        return result
    out = result.dataset
    current = str(out.get("SOPInstanceUID", "") or "").strip(" \0")
    new_uid = key.uid(f"lossy.{plan.transcode}", current)  # type: ignore[attr-defined]
    out.SOPInstanceUID = new_uid
    meta = getattr(out, "file_meta", None)
    if meta is not None:
        meta.MediaStorageSOPInstanceUID = new_uid
    sop_class = str(out.get("SOPClassUID", "") or "").strip(" \0")
    if current and sop_class:
        _add_predecessor(out, sop_class, current)
    return dataclasses.replace(result, dataset=out)


_SOURCE_IMAGE_SEQUENCE = 0x00082112


def _add_predecessor(out: Dataset, sop_class: str, sop_instance: str) -> None:
    """Append the "Uncompressed predecessor" reference to SourceImageSequence in a new
    Sequence (the items ``out`` had may be shared with the source dataset: never modified).

    A SourceImageSequence the file stores with another VR (UN, OB, LO, ...) is left as it
    was, without the reference: rewriting bytes we cannot read as items would change them."""
    items: list[Dataset] = []
    if _SOURCE_IMAGE_SEQUENCE in out:
        if out.get_item(_SOURCE_IMAGE_SEQUENCE).VR not in ("SQ", None):  # None: implicit VR
            return
        try:
            items = list(out[_SOURCE_IMAGE_SEQUENCE].value or [])
        except Exception:  # noqa: BLE001 - not a sequence after all: leave it as it was
            return
        if not all(isinstance(item, Dataset) for item in items):
            return
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = ("121320", "DCM", "Uncompressed predecessor")
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    item.PurposeOfReferenceCodeSequence = Sequence([purpose])
    _set(out, "SourceImageSequence", Sequence([*items, item]))
