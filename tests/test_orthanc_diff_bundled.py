"""Differential sweep over every file pydicom bundles: Orthanc 1.10.1's
/instances/{id}/anonymize (DicomVersion 2021b and 2008) and /modify (the sweep body of
test_orthanc_diff_modify) against ours, tag by tag.

pydicom's test files are the odd ones (no file meta, big endian, deflate, private sequences,
every compression, damaged files, VR UN), so the sweep also checks who refuses what: we never
refuse a file Orthanc accepts, and we accept only the files listed in ``ORTHANC_REFUSES``
that Orthanc refuses. Needs ``/usr/sbin/Orthanc`` (skipped otherwise); no shared samples.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file

from tests.compare import (
    UidStructure,
    collect_identifiers,
    compare_datasets,
    deliberate,
    engine_modules,
    judge,
    ours_for,
    read,
)
from tests.orthanc_ref import TEST_DICTIONARY, OrthancClient, OrthancHTTPError, orthanc, orthanc_process  # noqa: F401
from tests.test_orthanc_diff_anonymize import DELIBERATE_DIFFERENCES, PATIENT_NAME, _differences
from tests.test_orthanc_diff_modify import DELIBERATE_DIFFERENCES as MODIFY_DIFFERENCES
from tests.test_orthanc_diff_modify import SWEEP_BODY
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


def _both(path: Path, plan: Any, route: Callable[[str], bytes]) -> tuple[Any, Any] | None:
    """(ours, Orthanc's) for ``path``, or None when a side refused it, after checking who
    refuses what: never only us; Orthanc alone only for the files in ORTHANC_REFUSES."""
    data = path.read_bytes()
    try:
        ours = ours_for(plan, data)
    except DeidError:
        ours = None
    try:
        reference = read(route(data))
    except OrthancHTTPError as exc:
        assert exc.status in (400, 404), exc  # 404 "Inexistent tag": a missing identifier
        reference = None
    if ours is None:
        assert reference is None, "we refuse a file Orthanc accepts"
        return None
    if reference is None:
        assert path.name in ORTHANC_REFUSES, "Orthanc refuses a file we accept: list it, with why"
        return None
    assert path.name not in ORTHANC_REFUSES
    return ours, reference


@pytest.mark.parametrize("version", ["2021b", "2008"])
@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(FILES[0].parent.parent)) for p in FILES])
def test_bundled_file_anonymize_matches_orthanc(orthanc: OrthancClient, path: Path, version: str) -> None:
    body = {"DicomVersion": version}
    plan = engine_modules()[0].parse_anonymize(body, dictionary=TEST_DICTIONARY)
    both = _both(path, plan, lambda data: orthanc.anonymize_instance(orthanc.upload_once(data), body))
    if both is not None:
        uids = UidStructure(collect_identifiers([read(path.read_bytes())], extra_tags=[PATIENT_NAME]))
        judge([_differences(*both, uids, f"{path.name} [{version}]")], BUNDLED_DIFFERENCES)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(FILES[0].parent.parent)) for p in FILES])
def test_bundled_file_modify_matches_orthanc(orthanc: OrthancClient, path: Path) -> None:
    plan = engine_modules()[0].parse_modify(SWEEP_BODY, dictionary=TEST_DICTIONARY)
    both = _both(path, plan, lambda data: orthanc.modify_instance(orthanc.upload_once(data), SWEEP_BODY))
    if both is not None:
        label = f"{path.name} [modify sweep]"
        uids = UidStructure(collect_identifiers([read(path.read_bytes())]))
        judge([(label, compare_datasets(*both, uids=uids, where=label))], MODIFY_DIFFERENCES)


def test_the_sweep_has_its_files():
    assert len(FILES) > 150


#: Standard transfer syntaxes newer than Orthanc 1.10.1 (and, but for HTJ2K, than pydicom 3.0).
NEWER_SYNTAXES = ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.8.1")


@pytest.mark.parametrize("syntax", NEWER_SYNTAXES)
def test_newer_syntaxes_orthanc_refuses_to_anonymize_we_pass_through(orthanc: OrthancClient, syntax: str) -> None:
    """README, differences on purpose: Orthanc 1.10.1 stores a file in HTJ2K, JPEG XL or
    frame-deflate syntax but answers 400 to its /anonymize and /modify; ours anonymizes it,
    pixel data and syntax kept. (The codestream is the bundled JPEG's: only the data set and
    its declared syntax matter to both sides here.)"""
    path = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    raw, source = path.read_bytes(), read(path.read_bytes())
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")  # after (0002,0000) and its group
    dicomio = engine_modules()[3]
    data = dicomio.encode_file_meta(source.SOPClassUID, source.SOPInstanceUID, syntax) + raw[meta_end:]
    instance = orthanc.upload_once(data)
    for route in (lambda: orthanc.anonymize_instance(instance, {}), lambda: orthanc.modify_instance(instance, SWEEP_BODY)):
        with pytest.raises(OrthancHTTPError) as refused:
            route()
        assert refused.value.status == 400
    request = engine_modules()[0]
    for plan in (request.parse_anonymize({}), request.parse_modify(SWEEP_BODY, dictionary=TEST_DICTIONARY)):
        ours = ours_for(plan, data)
        assert ours.file_meta.TransferSyntaxUID == syntax and ours.PixelData == source.PixelData
