from __future__ import annotations

import pydicom

from tests.conftest import sample
from transforms.orthanc_ids import is_orthanc_id, orthanc_ids


def test_knee_ids_match_orthanc(samples):
    ds = pydicom.dcmread(sample("Knee/T1/IM-0001-0001.dcm"), stop_before_pixels=True)
    ids = orthanc_ids(ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    # Values hard-coded in Orthanc's integration tests.
    assert ids["study"] == "0a9b3153-2512774b-2d9580de-1fc3dcf6-3bd83918"
    assert ids["series"] == "6de73705-c4e65c1b-9d9ea1b5-cabcd8e7-f15e4285"
    assert ids["patient"].startswith("ca29faea-")
    assert all(is_orthanc_id(v) for v in ids.values())


def test_missing_patient_id_counts_as_empty():
    assert orthanc_ids(None, "1", "2", "3") == orthanc_ids("", "1", "2", "3")
    assert not is_orthanc_id("1.2.3")
