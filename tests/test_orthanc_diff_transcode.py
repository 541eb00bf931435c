"""Differential test: ``Transcode`` in /modify against a live Orthanc 1.10.1.

Orthanc's instance route transcodes after the modification; our side runs the engine, then
``transforms.transcode.transcode`` (as the pipeline does). Everything is compared tag by tag.
Where both write an uncompressed or deflated syntax, PixelData must be byte-identical; where the
target is compressed, the encoders differ (DCMTK against ours), so the decoded pixels are
compared instead. Lossless targets are those Orthanc 1.10.1 can produce; the lossy ones are
its two JPEG targets (.4.50, .4.51), through ``transcode_for_plan`` as the pipeline calls it:
the same new SOPInstanceUID structure, the same lossy attributes (ratio and description within
2%: another encoder build may differ by a few bytes), the predecessor reference, and decoded
pixels within 2 grey levels of DCMTK's (identical with the codecs measured here).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from tests.compare import (
    KEY_BYTES,
    WRITER_DIFFERENCES,
    Deliberate,
    UidStructure,
    check_expectations,
    collect_identifiers,
    compare_datasets,
    deliberate,
    engine_modules,
    judge,
    read,
)
from tests.conftest import sample
from tests.orthanc_ref import TEST_DICTIONARY, OrthancClient, orthanc, orthanc_process  # noqa: F401

pytestmark = pytest.mark.orthanc

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
JPEG_LOSSLESS_57 = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_70 = "1.2.840.10008.1.2.4.70"
JPEG_LS = "1.2.840.10008.1.2.4.80"
COMPRESSED = frozenset({JPEG_LOSSLESS_57, JPEG_LOSSLESS_70, JPEG_LS})

#: Differences kept on purpose when the target syntax is compressed.
DELIBERATE_DIFFERENCES: list[Deliberate] = [
    *WRITER_DIFFERENCES,
    deliberate("PixelData", ["value"], "top",
               reason="compressed targets: a different encoder gives a different bitstream; "
                      "the decoded pixels are compared instead and must be equal"),
    deliberate("DerivationDescription", ["missing"], "top",
               reason="DCMTK's JPEG encoder writes 'Lossless JPEG compression, selection "
                      "value ..., compression ratio ...'; a lossless transcode needs no note"),
]


@dataclasses.dataclass(frozen=True)
class TranscodeCase:
    name: str
    file: str
    body: dict[str, Any]


CASES = [
    TranscodeCase("explicit-to-implicit", "Brainix/Flair/IM-0001-0006.dcm", {"Transcode": IMPLICIT}),
    TranscodeCase("explicit-to-deflated", "Brainix/Flair/IM-0001-0006.dcm", {"Transcode": DEFLATED}),
    TranscodeCase("explicit-to-big-endian", "Brainix/Flair/IM-0001-0006.dcm", {"Transcode": BIG_ENDIAN}),
    TranscodeCase("jpeg-ls-to-explicit", "TransferSyntaxes/1.2.840.10008.1.2.4.80.dcm", {"Transcode": EXPLICIT}),
    TranscodeCase("jpeg-lossless-to-explicit", "TransferSyntaxes/1.2.840.10008.1.2.4.70.dcm", {"Transcode": EXPLICIT}),
    TranscodeCase("jpeg-57-to-implicit", "TransferSyntaxes/1.2.840.10008.1.2.4.57.dcm", {"Transcode": IMPLICIT}),
    TranscodeCase("rle-to-explicit", "TransferSyntaxes/1.2.840.10008.1.2.5.dcm", {"Transcode": EXPLICIT}),
    TranscodeCase("to-jpeg-lossless-70", "KarstenHilbertRF.dcm", {"Transcode": JPEG_LOSSLESS_70}),
    TranscodeCase("to-jpeg-lossless-57", "KarstenHilbertRF.dcm", {"Transcode": JPEG_LOSSLESS_57}),
    TranscodeCase("to-jpeg-ls", "KarstenHilbertRF.dcm", {"Transcode": JPEG_LS}),
    TranscodeCase(  # modification and transcoding in one request
        "replace-and-transcode", "Brainix/Epi/IM-0001-0005.dcm",
        {"Replace": {"PatientName": "Transcoded"}, "Remove": ["StationName"], "Transcode": IMPLICIT}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_transcode_matches_orthanc(orthanc: OrthancClient, case: TranscodeCase) -> None:
    data = sample(case.file).read_bytes()
    target = case.body["Transcode"]
    reference = read(orthanc.modify_instance(orthanc.upload_sample(case.file), case.body))
    assert reference.file_meta.TransferSyntaxUID == target

    request, engine, identity, dicomio = engine_modules()
    from transforms.transcode import transcode

    plan = request.parse_modify(case.body, dictionary=TEST_DICTIONARY)
    assert plan.transcode == target
    modified = engine.apply(plan, dicomio.read_dataset(data), identity.Key.from_bytes(KEY_BYTES))
    ours = read(dicomio.write_dataset(transcode(modified, target)))
    assert ours.file_meta.TransferSyntaxUID == target
    expect = {key: value for key, value in case.body.get("Replace", {}).items()}
    assert check_expectations(ours, expect, "ours") == []

    if target in COMPRESSED:
        # Decoded with the project's own codec stack (the [codecs] extra): pydicom's plugins
        # for JPEG lossless need gdcm or GPL libjpeg, which we deliberately do not install.
        from transforms.transcode import decode_pixels

        ours_pixels = decode_pixels(ours)[0]
        assert np.array_equal(ours_pixels, decode_pixels(reference)[0])
        assert np.array_equal(ours_pixels, decode_pixels(read(data))[0])
        table = DELIBERATE_DIFFERENCES
    else:
        table = list(WRITER_DIFFERENCES)  # uncompressed and deflated: identical pixel bytes
    uids = UidStructure(collect_identifiers([read(data)]))
    label = f"{case.file} [{case.name}]"
    judge([(label, compare_datasets(ours, reference, uids=uids, where=label))], table)


@pytest.mark.parametrize(("source_implicit", "target"), [(False, "1.2.840.10008.1.2"), (True, "1.2.840.10008.1.2.1"),
                                                         (False, "1.2.840.10008.1.2.2")])
def test_text_invalid_in_its_character_set_keeps_its_bytes_as_in_orthanc(orthanc: OrthancClient, source_implicit: bool,
                                                                          target: str) -> None:
    """UTF-8 declared, Latin-1 written, at the top level and in an item: DCMTK writes the bytes
    it read in any transfer syntax, and so do we (pydicom's writer wrote "?" for them)."""
    from tests.test_dicomio import _BAD_NAME, _BAD_NESTED, _BAD_TOP, _damaged_text_file

    data = _damaged_text_file(source_implicit)
    body = {"Replace": {"StationName": "x"}, "Transcode": target}
    reference = orthanc.modify_instance(orthanc.upload_once(data), body)
    request, engine, identity, dicomio = engine_modules()
    from transforms.transcode import transcode

    modified = engine.apply(request.parse_modify(body), dicomio.read_dataset(data), identity.Key.from_bytes(KEY_BYTES))
    ours = dicomio.write_dataset(transcode(modified, target))
    assert read(reference).file_meta.TransferSyntaxUID == read(ours).file_meta.TransferSyntaxUID == target
    assert [m in reference for m in (_BAD_TOP, _BAD_NESTED, _BAD_NAME)] == [True] * 3
    assert [m in ours for m in (_BAD_TOP, _BAD_NESTED, _BAD_NAME)] == [True] * 3


JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"

#: Differences kept on purpose for the lossy JPEG targets.
LOSSY_DELIBERATE: list[Deliberate] = [
    *WRITER_DIFFERENCES,
    deliberate("PixelData", ["value"], "top",
               reason="another encoder's bitstream; the decoded pixels are compared instead"),
    deliberate("LossyImageCompressionRatio", ["value"], "top",
               reason="checked within 2% below (a codec build may differ by a few bytes)"),
    deliberate("DerivationDescription", ["value"], "top",
               reason="ends with the ratio, checked within 2% below"),
    deliberate("ModalityLUTSequence", ["extra"], "top", sample="KarstenHilbertRF.dcm",
               reason="we compress the stored values and keep the Modality LUT that gives them "
                      "meaning; DCMTK renders the pixels through it and drops it"),
    deliberate("PixelIntensityRelationship", ["value"], "top", sample="KarstenHilbertRF.dcm",
               ours="LIN", reference="DISP",
               reason="kept with the Modality LUT; DCMTK writes DISP once it has applied it"),
]

LOSSY_CASES = [
    TranscodeCase("rf-8bit-to-jpeg-baseline", "KarstenHilbertRF.dcm", {"Transcode": JPEG_BASELINE}),
    TranscodeCase("rgb-to-jpeg-baseline", "ColorTestMalaterre.dcm", {"Transcode": JPEG_BASELINE}),
    TranscodeCase("rf-8bit-to-jpeg-extended", "KarstenHilbertRF.dcm", {"Transcode": JPEG_EXTENDED}),
    TranscodeCase("mr-12bit-to-jpeg-extended", "Brainix/Flair/IM-0001-0006.dcm",
                  {"Transcode": JPEG_EXTENDED, "Replace": {"SeriesDescription": "lossy"}}),
    # no ImageType: DERIVED is the whole value
    TranscodeCase("rle-rgb-without-image-type", "2022-11-14-RLEPlanarConfiguration.dcm", {"Transcode": JPEG_BASELINE}),
    # Smallest/LargestImagePixelValue: dropped, the new pixels may lie outside them
    TranscodeCase("extremes-dropped", "Issue143.dcm", {"Transcode": JPEG_EXTENDED}),
]


def _ratio_and_description(ds: Any) -> tuple[float, str]:
    description = str(ds.DerivationDescription)
    head, _, ratio = description.rpartition(" compression ratio ")
    assert float(ratio) == float(ds.LossyImageCompressionRatio), description
    return float(ds.LossyImageCompressionRatio), head


@pytest.mark.parametrize("case", LOSSY_CASES, ids=[c.name for c in LOSSY_CASES])
def test_lossy_transcode_matches_orthanc(orthanc: OrthancClient, case: TranscodeCase) -> None:
    data = sample(case.file).read_bytes()
    target = case.body["Transcode"]
    reference = read(orthanc.modify_instance(orthanc.upload_sample(case.file), case.body))
    request, engine, identity, dicomio = engine_modules()
    from transforms.transcode import decode_pixels, transcode_for_plan

    key = identity.Key.from_bytes(KEY_BYTES)
    plan = request.parse_modify(case.body, dictionary=TEST_DICTIONARY)
    modified = engine.apply(plan, dicomio.read_dataset(data), key)
    ours = read(dicomio.write_dataset(transcode_for_plan(plan, modified, key).dataset))

    for side in (ours, reference):
        assert side.file_meta.TransferSyntaxUID == target
        assert (side.LossyImageCompression, side.LossyImageCompressionMethod) == ("01", "ISO_10918_1")
        assert (side.ImageType if isinstance(side.ImageType, str) else side.ImageType[0]) == "DERIVED"
        [predecessor] = side.SourceImageSequence
        assert predecessor.ReferencedSOPClassUID == side.SOPClassUID
        assert predecessor.PurposeOfReferenceCodeSequence[0].CodeValue == "121320"
        assert predecessor.ReferencedSOPInstanceUID != side.SOPInstanceUID
    # the predecessor is the modification's instance, never written: ours is keyed
    assert ours.SourceImageSequence[0].ReferencedSOPInstanceUID == modified.SOPInstanceUID
    (our_ratio, our_text), (their_ratio, their_text) = map(_ratio_and_description, (ours, reference))
    assert our_text == their_text
    assert abs(our_ratio / their_ratio - 1) < 0.02, (our_ratio, their_ratio)
    our_pixels, their_pixels = (decode_pixels(ds)[0].astype(np.int32) for ds in (ours, reference))
    assert our_pixels.shape == their_pixels.shape
    assert np.abs(our_pixels - their_pixels).max() <= 2

    uids = UidStructure(collect_identifiers([read(data)]))
    label = f"{case.file} [{case.name}]"
    judge([(label, compare_datasets(ours, reference, uids=uids, where=label))], LOSSY_DELIBERATE)
