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


def test_leading_spaces_of_patient_id_count_trailing_ones_do_not():
    """Orthanc 1.10.1 hashes a PatientID with its leading spaces (DCMTK strips trailing padding
    only): the Knee study with PatientID "  887" is 2384c6ae-... on a live Orthanc 1.10.1."""
    study_uid = "2.16.840.1.113669.632.20.121711.10000160881"
    assert orthanc_ids("  887", study_uid, "", "")["study"] == "2384c6ae-4ed24ce9-e33cb5f0-cefdf435-9f5a6ee0"
    assert orthanc_ids("  887 \0", study_uid, "", "") == orthanc_ids("  887", study_uid, "", "")
    assert orthanc_ids("887", study_uid, "", "")["study"] != orthanc_ids("  887", study_uid, "", "")["study"]


def test_a_multi_valued_patient_id_is_hashed_as_written():
    """PatientID 'A1\\B2' (VM 1 in the standard, seen in the wild): Orthanc 1.10.1 names the
    patient a342c58e-... (sha1 of the text); we used to hash an empty PatientID."""
    from pydicom.data import get_testdata_file

    from transforms import dicomio, files
    from transforms import splitmerge as sm

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientID = ["A1", "B2"]
    read = dicomio.read_dataset(dicomio.write_dataset(ds))
    assert files.safe_str(read, "PatientID") == "A1\\B2"
    assert orthanc_ids(files.safe_str(read, "PatientID"), "", "", "")["patient"] == \
        "a342c58e-5645ab17-b54aefaa-132162e1-5d0d3971"
    assert sm.index_entry("x.dcm", read).patient == "a342c58e-5645ab17-b54aefaa-132162e1-5d0d3971"


def _converted(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The same data set with every top-level element decoded by pydicom (no raw bytes left)."""
    for _ in ds:  # iterating a Dataset converts its raw elements in place
        pass
    return ds


def test_the_index_reads_plain_ascii_identifiers_without_pydicom_and_the_rest_with_it():
    """Split/merge's index reads four identifiers of every file: plain ASCII values from their
    bytes, the others through pydicom; both give the same index entry, padding, leading
    spaces, a backslash and a character set included."""
    from pydicom.data import get_testdata_file

    from transforms import dicomio
    from transforms import splitmerge as sm

    cases = [  # (SpecificCharacterSet, PatientID, expected index PatientID)
        (None, "  887 ", "  887"),
        ("ISO_IR 100", "M\u00fcller-42", "M\u00fcller-42"),
        ("ISO_IR 192", "\u60a3\u8005 7", "\u60a3\u8005 7"),
        (["", "ISO 2022 IR 87"], "\u5c71\u7530", "\u5c71\u7530"),
        (None, ["A1", "B2"], "A1\\B2"),
        ("ISO_IR 13", "ID~77", "ID~77"),
    ]
    for charset, patient_id, expected in cases:
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        if charset:
            ds.SpecificCharacterSet = charset
        ds.PatientID = patient_id
        ds.StudyInstanceUID = "1.2.3.4"
        data = dicomio.write_dataset(ds)
        raw = dicomio.read_dataset(data)
        assert raw._dict[0x0020000D].value == b"1.2.3.4\0"  # padded to an even length with a NUL
        entry = sm.index_entry("x.dcm", raw)
        assert entry == sm.index_entry("x.dcm", _converted(dicomio.read_dataset(data))), patient_id
        assert (entry.patient_id, entry.study_uid) == (expected, "1.2.3.4"), patient_id
        assert entry.patient == orthanc_ids(expected, "", "", "")["patient"]
