"""Differential sweep over every file pydicom bundles: Orthanc 1.10.1's
/instances/{id}/anonymize (DicomVersion 2021b and 2008) and /modify (the sweep body of
test_orthanc_diff_modify) against ours, tag by tag.

pydicom's test files are the odd ones (no file meta, big endian, deflate, private sequences,
every compression, damaged files, VR UN), so the sweep also checks who refuses what: we never
refuse a file Orthanc accepts, and we accept only the files listed in ``ORTHANC_REFUSES``
that Orthanc refuses. Needs ``/usr/sbin/Orthanc`` (skipped otherwise); no shared samples.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tests.compare import UidStructure, collect_identifiers, deliberate, engine_modules, judge, ours_for, read
from tests.orthanc_ref import TEST_DICTIONARY, OrthancClient, OrthancHTTPError, orthanc, orthanc_process  # noqa: F401
from tests.test_orthanc_diff_anonymize import DELIBERATE_DIFFERENCES, PATIENT_NAME, _differences
from transforms.errors import DeidError

pytestmark = pytest.mark.orthanc

FILES = sorted(p for p in Path(get_testdata_file("CT_small.dcm")).parent.rglob("*")
               if p.is_file() and p.stat().st_size < 5_000_000)

#: Files Orthanc 1.10.1 refuses to store that we read, and why we do.
ORTHANC_REFUSES = {
    "SC_rgb_jpeg.dcm": "PixelData in implicit VR inside an explicit VR file; pydicom reads it too",
}

BUNDLED_DIFFERENCES = [
    *DELIBERATE_DIFFERENCES,
    deliberate(0, ["vr"], "top", mask=0, reference="UN", sample="rtdose_rle",
               reason="as for 2022-03-08-RicSmi.dcm: PatientID, FrameOfReferenceUID and "
                      "ReferencedRTPlanSequence stored with explicit VR UN are anonymized by their "
                      "dictionary VR; Orthanc keeps them as opaque bytes, original values included"),
]


@pytest.mark.parametrize("version", ["2021b", "2008"])
@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(FILES[0].parent.parent)) for p in FILES])
def test_bundled_file_anonymize_matches_orthanc(orthanc: OrthancClient, path: Path, version: str) -> None:
    body = {"DicomVersion": version}
    data = path.read_bytes()
    request = engine_modules()[0]
    try:
        ours = ours_for(request.parse_anonymize(body, dictionary=TEST_DICTIONARY), data)
    except DeidError:
        ours = None
    try:
        reference = read(orthanc.anonymize_instance(orthanc.upload_once(data), body))
    except OrthancHTTPError as exc:
        assert exc.status in (400, 404), exc  # 404 "Inexistent tag": a missing identifier
        reference = None
    if ours is None:
        assert reference is None, "we refuse a file Orthanc anonymizes"
        return
    if reference is None:
        assert path.name in ORTHANC_REFUSES, "Orthanc refuses a file we anonymize: list it, with why"
        return
    assert path.name not in ORTHANC_REFUSES
    uids = UidStructure(collect_identifiers([read(data)], extra_tags=[PATIENT_NAME]))
    judge([_differences(ours, reference, uids, f"{path.name} [{version}]")], BUNDLED_DIFFERENCES)


def test_the_sweep_has_its_files():
    assert len(FILES) > 150


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(FILES[0].parent.parent)) for p in FILES])
def test_bundled_file_modify_matches_orthanc(orthanc: OrthancClient, path: Path) -> None:
    from tests.compare import compare_datasets
    from tests.test_orthanc_diff_modify import DELIBERATE_DIFFERENCES as MODIFY_DIFFERENCES
    from tests.test_orthanc_diff_modify import SWEEP_BODY

    data = path.read_bytes()
    request = engine_modules()[0]
    try:
        ours = ours_for(request.parse_modify(SWEEP_BODY, dictionary=TEST_DICTIONARY), data)
    except DeidError:
        ours = None
    try:
        reference = read(orthanc.modify_instance(orthanc.upload_once(data), SWEEP_BODY))
    except OrthancHTTPError as exc:
        assert exc.status in (400, 404), exc
        reference = None
    if ours is None or reference is None:
        assert (ours is None) == (reference is None) or path.name in ORTHANC_REFUSES
        return
    label = f"{path.name} [modify sweep]"
    uids = UidStructure(collect_identifiers([read(data)]))
    judge([(label, compare_datasets(ours, reference, uids=uids, where=label))], MODIFY_DIFFERENCES)
