"""Differential test: the bodies Orthanc 1.10.1 refuses, we refuse too (and vice versa).

Each body goes to ``POST /instances/{id}/modify|anonymize`` on DummyCT.dcm. Orthanc's answer
is an HTTP error (400, or 500 for an unknown tag name) or a file; ours is a ``DeidError``
(``RequestError`` for the body, raised by the parser or, for values that only fail when cast
to the tag's VR, by the engine) or a dataset. The message must name the offending key or tag,
never a value from the file.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import pytest

from tests.compare import KEY_BYTES, engine_modules
from tests.conftest import sample
from tests.orthanc_ref import TEST_DICTIONARY, OrthancClient, OrthancHTTPError, orthanc, orthanc_process  # noqa: F401

pytestmark = pytest.mark.orthanc

FILE = "DummyCT.dcm"
#: Values of DummyCT.dcm that must never appear in an error message.
FILE_VALUES = ("KNIX", "ozp00SjY2xG", "1.2.840.113619.2.176.2025.1499492.7040.1171286242.109")


@dataclasses.dataclass(frozen=True)
class BodyCase:
    name: str
    operation: str  # 'modify' or 'anonymize'
    body: Any
    orthanc_status: int | None  # None: Orthanc accepts it
    mentions: str = ""  # a word our message must contain (the key or tag)
    deliberate: str = ""  # why we decide the other way than Orthanc 1.10.1 (see below)
    known_bug: str = ""  # we decide the other way by mistake (reported; the case is xfail)

    @property
    def ours_refuses(self) -> bool:
        return (self.orthanc_status is not None) != bool(self.deliberate)


def _uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode("ascii")


CASES = [
    BodyCase("replace-patientid-without-force", "modify", {"Replace": {"PatientID": "x"}}, 400, "PatientID"),
    BodyCase("keep-sop-without-force", "modify", {"Keep": ["SOPInstanceUID"]}, 400, "SOPInstanceUID"),
    BodyCase("remove-study-uid-with-force", "modify", {"Remove": ["StudyInstanceUID"], "Force": True}, 400, "StudyInstanceUID"),
    BodyCase("anonymize-keep-series-uid-without-force", "anonymize", {"Keep": ["SeriesInstanceUID"], "DicomVersion": "2021b"}, 400, "SeriesInstanceUID"),
    BodyCase("anonymize-keep-patientid-with-force", "anonymize", {"Keep": ["PatientID"], "Force": True}, 400, "PatientID"),
    BodyCase("remove-and-replace-sop-uid", "modify",
             {"Remove": ["SOPInstanceUID"], "Replace": {"SOPInstanceUID": "1.2.3.4"}, "Force": True}, None),
    BodyCase("non-ascii-code-string", "modify", {"Replace": {"Modality": "\u03a9"}}, None, "Modality",
             deliberate="a VR without character set cannot hold it: refused naming the tag, where "
                        "Orthanc silently drops the character"),
    BodyCase("unknown-tag-name", "modify", {"Replace": {"NoSuchTag": "x"}}, 500, "NoSuchTag"),
    BodyCase("remove-not-array", "modify", {"Remove": "StationName"}, 400, "Remove"),
    BodyCase("replace-not-object", "modify", {"Replace": ["StationName"]}, 400, "Replace"),
    BodyCase("keep-entry-not-string", "modify", {"Keep": [7]}, 400, "Keep"),
    BodyCase("force-not-boolean", "modify", {"Force": "yes"}, 400, "Force"),
    BodyCase("remove-private-not-boolean", "modify", {"RemovePrivateTags": 1}, 400, "RemovePrivateTags"),
    BodyCase("private-creator-not-string", "modify", {"PrivateCreator": 5}, 400, "PrivateCreator"),
    BodyCase("body-not-object", "modify", ["StationName"], 400, ""),
    BodyCase("value-number", "modify", {"Replace": {"StationName": 3}}, 400, "StationName"),
    BodyCase("value-array-on-string-tag", "modify", {"Replace": {"StationName": [{}]}}, 400, "StationName"),
    BodyCase("us-not-a-number", "modify", {"Replace": {"Rows": "abc"}}, 400, "Rows"),
    BodyCase("us-out-of-range", "modify", {"Replace": {"Rows": "70000"}}, 400, "Rows"),
    BodyCase("us-null", "modify", {"Replace": {"Rows": None}}, 400, "Rows"),
    BodyCase("fd-not-a-number", "modify", {"Replace": {"0018,9087": "x"}}, 400, "0018,9087"),
    BodyCase("bad-path-index", "modify", {"Replace": {"DerivationCodeSequence[x].CodeValue": "a"}}, 400, "DerivationCodeSequence"),
    BodyCase("path-parent-without-index", "modify", {"Remove": ["DerivationCodeSequence.CodeValue"]}, 400, "DerivationCodeSequence"),
    BodyCase("bad-data-uri", "modify", {"Replace": {"EncryptedContent": "data:application/octet-stream;base64,@@"}}, 400, "EncryptedContent"),
    BodyCase("ow-odd-length", "modify", {"Replace": {"RedPaletteColorLookupTableData": _uri(b"abc")}}, 500, "RedPaletteColorLookupTableData"),
    BodyCase("sop-uid-not-string", "modify", {"Replace": {"SOPInstanceUID": 5}, "Force": True}, 400, "SOPInstanceUID"),
    BodyCase("sequence-item-not-object", "modify", {"Replace": {"ReferencedStudySequence": ["x"]}}, 400, "ReferencedStudySequence"),
    BodyCase("unknown-transcode", "modify", {"Transcode": "1.2.3.4"}, 400, "Transcode"),
    BodyCase("unknown-dicom-version", "anonymize", {"DicomVersion": "nope"}, 400, "DicomVersion"),
    BodyCase("dicom-version-not-string", "anonymize", {"DicomVersion": 2021}, 400, "DicomVersion"),
    BodyCase("anonymize-null-study-uid", "anonymize",
             {"Replace": {"StudyInstanceUID": None}, "Force": True, "DicomVersion": "2021b"}, 400,
             "StudyInstanceUID"),
    BodyCase("anonymize-null-series-uid-replace-beats-remove", "anonymize",
             {"Replace": {"SeriesInstanceUID": None}, "Remove": ["SeriesInstanceUID"], "Force": True,
              "DicomVersion": "2021b"}, 400, "SeriesInstanceUID"),
    BodyCase("surviving-bad-spelling", "modify", {"Replace": {"Rows": "abc", "0028,0010": "5"}}, 400, "Rows"),
    BodyCase("item-spellings-both-cast", "modify",
             {"Replace": {"ReferencedStudySequence": [{"Rows": "5", "0028,0010": "abc"}]}}, 400, "Rows"),
    # Accepted by both:
    BodyCase("anonymize-null-study-uid-kept", "anonymize",
             {"Replace": {"StudyInstanceUID": None}, "Keep": ["StudyInstanceUID"], "Force": True,
              "DicomVersion": "2021b"}, None),
    BodyCase("modify-null-study-uid", "modify", {"Replace": {"StudyInstanceUID": None}, "Force": True}, None),
    BodyCase("sop-class-null-kept", "modify", {"Replace": {"SOPClassUID": None}, "Keep": ["SOPClassUID"]}, None),
    BodyCase("keep-beats-bad-value", "modify", {"Replace": {"Rows": "abc"}, "Keep": ["Rows"]}, None),
    BodyCase("later-spelling-beats-bad-value", "modify", {"Replace": {"0028,0010": "abc", "Rows": "5"}}, None),
    BodyCase("repeating-group-keyword", "modify", {"Keep": ["OverlayRows"], "Remove": ["OverlayData"]}, None),
    BodyCase("keep-sop-with-force", "modify", {"Keep": ["SOPInstanceUID"], "Force": True}, None),
    BodyCase("nested-patientid-needs-no-force", "modify", {"Replace": {"ReferencedImageSequence[*].PatientID": "x"}}, None),
    BodyCase("empty-body", "modify", {}, None),
    BodyCase("anonymize-2008", "anonymize", {"DicomVersion": "2008"}, None),
    # Decided differently on purpose:
    BodyCase("ds-not-a-number", "modify", {"Replace": {"PatientWeight": "abc"}}, None, "PatientWeight",
             deliberate="values are cast to the tag's VR and refused when they do not fit; "
                        "Orthanc stores DS/IS/DA/... strings unchecked"),
    BodyCase("is-not-a-number", "modify", {"Replace": {"SeriesNumber": "1.5"}}, None, "SeriesNumber",
             deliberate="as above, for IS"),
    BodyCase("anonymize-2023b", "anonymize", {"DicomVersion": "2023b"}, 400,
             deliberate="we implement the 2023b edition (our default, as in Orthanc >= 1.12); "
                        "Orthanc 1.10.1 predates it"),
    BodyCase("ul-list", "modify", {"Replace": {"SimpleFrameList": "1\\2\\3"}}, 400,
             deliberate="a backslash list for UL is accepted, as Orthanc 1.12 does "
                        "(orthanc-behavior.md 7); 1.10.1 refuses it"),
    BodyCase("xs-negative", "modify", {"Replace": {"SmallestImagePixelValue": "-5"}}, 400,
             deliberate="US-or-SS with a '-' is written as SS, as Orthanc 1.12 does "
                        "(orthanc-behavior.md 7); 1.10.1 refuses it"),
    BodyCase("us-list-for-vm-4", "modify", {"Replace": {"AcquisitionMatrix": "0\\256\\256\\0"}}, 400,
             deliberate="a backslash list for a multi-valued US/FD tag (AcquisitionMatrix, VM 4) "
                        "is accepted; Orthanc refuses every list for binary numbers"),
    BodyCase("nul-inside-text", "modify", {"Replace": {"StudyDescription": _uri(b"a\0b")}}, None,
             "StudyDescription",
             deliberate="a NUL inside a text value is refused naming the tag; Orthanc cuts the "
                        "value there and silently drops the rest (trailing NULs are padding and "
                        "are stripped by both)"),
    BodyCase("us-list-for-vm-1", "modify", {"Replace": {"Rows": "1\\2"}}, 400, "Rows"),
    BodyCase("fd-list-for-vm-1", "modify", {"Replace": {"0018,9087": "1.5\\2"}}, 400, "0018,9087"),
    # found by replacing a tag of every VR with typical strings on both sides (Orthanc 1.10.1
    # answers 400 or 500 for any value of these VRs; where both accepted, the outputs were equal)
    BodyCase("ur-value", "modify", {"Replace": {"FileAccessURI": "http://example.org/x"}}, 500, "FileAccessURI",
             deliberate="a UR value (a URI) is written; Orthanc 1.10.1 fails on any (500)"),
    BodyCase("sv-value", "modify", {"Replace": {"SelectorSVValue": "-3"}}, 400, "SelectorSVValue",
             deliberate="the 64-bit VRs (SV, UV, OV) take integers in their range; Orthanc 1.10.1 "
                        "refuses any value"),
    BodyCase("uv-value", "modify", {"Replace": {"TotalNumberOfStudyRecords": "12"}}, 500, "TotalNumberOfStudyRecords",
             deliberate="the 64-bit VRs (SV, UV, OV) take integers in their range; Orthanc 1.10.1 "
                        "refuses any value (400) or fails on it (500)"),
    BodyCase("ss-list-for-vm-2", "modify", {"Replace": {"CenterOfCircularExposureControlSensingRegion": "1\\2"}},
             400, "CenterOfCircularExposureControlSensingRegion",
             deliberate="a backslash list for a multi-valued SS/UL/OD tag is accepted, as for US/FD; "
                        "Orthanc refuses every list for binary numbers"),
    BodyCase("at-list-for-vm-1", "modify", {"Replace": {"DimensionIndexPointer": "0020,9056\\0020,9057"}},
             None, "DimensionIndexPointer",
             deliberate="two values for an AT tag of VM 1 are refused with a message naming the "
                        "tag; Orthanc silently keeps the first value"),
]

#: Bodies on which we decide differently from Orthanc 1.10.1, with the reason.
DELIBERATE_DIFFERENCES = {case.name: case.deliberate for case in CASES if case.deliberate}


def _orthanc_answer(orthanc: OrthancClient, case: BodyCase) -> int | None:
    instance = orthanc.upload_sample(FILE)
    call = orthanc.modify_instance if case.operation == "modify" else orthanc.anonymize_instance
    try:
        call(instance, case.body)
    except OrthancHTTPError as error:
        return error.status
    return None


def _params() -> list[Any]:
    return [pytest.param(case, id=case.name, marks=[pytest.mark.xfail(
        reason=f"known bug: {case.known_bug}")] if case.known_bug else []) for case in CASES]


@pytest.mark.parametrize("case", _params())
def test_refusals_match_orthanc(orthanc: OrthancClient, case: BodyCase) -> None:
    data = sample(FILE).read_bytes()
    assert _orthanc_answer(orthanc, case) == case.orthanc_status
    if case.known_bug:
        assert not case.deliberate

    request, engine, identity, dicomio = engine_modules()
    from transforms.errors import DeidError, RequestError

    parse = request.parse_modify if case.operation == "modify" else request.parse_anonymize
    key = identity.Key.from_bytes(KEY_BYTES)
    if not case.ours_refuses:
        engine.apply(parse(case.body, dictionary=TEST_DICTIONARY), dicomio.read_dataset(data), key)
        return
    with pytest.raises(DeidError) as refused:
        engine.apply(parse(case.body, dictionary=TEST_DICTIONARY), dicomio.read_dataset(data), key)
    assert isinstance(refused.value, RequestError), f"{type(refused.value).__name__}: {refused.value}"
    message = str(refused.value)
    assert case.mentions in message
    assert not any(value in message for value in FILE_VALUES)


#: Body texts (not JSON values): what Orthanc's JsonCpp reads, and what we decide. The
#: StationName each gives is what the modified file holds (Orthanc) or must hold (ours).
SYNTAX_CASES = {
    "byte-order-mark": ("\ufeff" + '{"Replace": {"StationName": "BOM"}}', "BOM", None),
    "comments": ('// relabel\n{"Replace": {"StationName": /* the new one */ "C"}}', "C", None),
    "trailing-commas": ('{"Replace": {"StationName": "T",}, "Remove": ["OperatorsName",],}', "T", None),
    # Orthanc keeps the last of two equal keys silently; we refuse, naming the key (deliberate)
    "duplicate-key": ('{"Replace": {"StationName": "A"}, "Replace": {"StationName": "B"}}', "B",
                      "--body: key 'Replace' is given twice in one object (Orthanc would keep the last one silently); give it once"),
    # Orthanc ignores text after the body; we refuse it (deliberate)
    "trailing-text": ('{"Replace": {"StationName": "G"}} garbage', "G",
                      "--body: invalid JSON at line 1 column 35: Extra data"),
}


@pytest.mark.parametrize("case", list(SYNTAX_CASES))
def test_body_syntax_as_orthanc_reads_it(orthanc: OrthancClient, case: str) -> None:
    """Comments, trailing commas and a BOM are read as Orthanc 1.10.1 reads them (configs
    written for it run unchanged); a duplicate key and trailing text are refused on purpose."""
    import pydicom
    from io import BytesIO

    from pipelines.cli import load_request
    from transforms.errors import RequestError  # (UsageError, for JSON syntax, is one)

    text, station, our_error = SYNTAX_CASES[case]
    instance = orthanc.upload_sample(FILE)
    answer = orthanc._call("POST", f"/instances/{instance}/modify", text.encode("utf-8"), "application/json")
    assert pydicom.dcmread(BytesIO(answer)).StationName == station
    if our_error is not None:
        with pytest.raises(RequestError) as refused:
            load_request(text, None)
        assert str(refused.value) == our_error
        return
    body, _ = load_request(text, None)
    request, engine, identity, dicomio = engine_modules()
    out = engine.apply(request.parse_modify(body), dicomio.read_dataset(sample(FILE).read_bytes()),
                       identity.Key.from_bytes(KEY_BYTES))
    assert out.StationName == station
