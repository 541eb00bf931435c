"""Request bodies -> plans: keys, types, Force guard, precedence, levels (orthanc-behavior.md §2, §14)."""

from __future__ import annotations

import json
import pickle
import re

import pytest

from transforms import __version__
from transforms.errors import RequestError
from transforms.request import parse_anonymize, parse_level, parse_modify
from transforms.values import Value

PATIENT_NAME, PATIENT_ID = 0x00100010, 0x00100020
STUDY_UID, SERIES_UID, SOP_UID = 0x0020000D, 0x0020000E, 0x00080018
STATION, STUDY_DATE, INSTITUTION = 0x00081010, 0x00080020, 0x00080080


def _refused(parse, body, message, **kwargs):
    with pytest.raises(RequestError, match=re.escape(message)) as info:
        parse(body, **kwargs)
    assert info.value.reason == "refused_by_request"
    return str(info.value)


# ---------------------------------------------------------------- §14 error catalogue

@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "the modify request body must be a JSON object, got array"),
        ({"Force": "yes"}, "Force: expected true or false, got string"),
        ({"RemovePrivateTags": 1}, "RemovePrivateTags: expected true or false, got number"),
        ({"KeepLabels": "no"}, "KeepLabels: expected true or false"),
        ({"KeepSource": True, "Permissive": 0}, "Permissive: expected true or false"),
        # null is not "absent": Orthanc refuses it like any non-boolean (leave the key out)
        ({"Force": None}, "Force: expected true or false, got null"),
        ({"KeepSource": None}, "KeepSource: expected true or false, got null"),
        ({"RemovePrivateTags": None}, "RemovePrivateTags: expected true or false, got null"),
        ({"PrivateCreator": None}, "PrivateCreator: expected a string, got null"),
        ({"Priority": None}, "Priority: expected an integer, got null"),
        ({"Transcode": None}, "Transcode: expected a transfer syntax UID (a string), got null; allowed: 1.2.840"),
        ({"Level": None}, "Level: expected one of Patient, Study, Series, Instance (got null)"),
        ({"Dictionary": None}, "Dictionary: expected an object mapping private tags"),
        ({"Remove": "PatientName"}, "Remove: expected an array of tag names or paths, got string"),
        ({"Keep": {"a": 1}}, "Keep: expected an array of tag names or paths, got object"),
        ({"Remove": [12]}, "Remove: every entry must be a string (a tag name or path), got number"),
        ({"Replace": ["PatientName"]}, "Replace: expected an object mapping tag names or paths"),
        ({"Replace": {"PatientID": "x"}}, "Replace: marking tag 'PatientID' (0010,0020) as to be "
                                          "replaced requires the \"Force\" option to be set to true"),
        ({"Keep": ["SOPInstanceUID"]}, "Keep: marking tag 'SOPInstanceUID' (0008,0018) as to be "
                                       "kept requires the \"Force\" option"),
        ({"Remove": ["StudyInstanceUID"]}, "as to be removed requires the \"Force\" option"),
        ({"Remove": ["SeriesInstanceUID"], "Force": True},
         "Remove: removing 'SeriesInstanceUID' (0020,000E) is forbidden even with \"Force\""),
        ({"Remove": ["A[0"]}, "Remove: bad path 'A[0': the last element cannot have an index"),
        ({"Remove": ["ReferencedImageSequence.ReferencedSOPClassUID"]},
         "Remove: bad path 'ReferencedImageSequence.ReferencedSOPClassUID': parent "
         "'ReferencedImageSequence' has no [index]"),
        ({"Keep": ["NotATag"]}, "Keep: unknown tag 'NotATag'"),
        ({"PrivateCreator": 5}, "PrivateCreator: expected a string, got number"),
        ({"Replace": {"Rows": "abc"}}, "Replace: tag 'Rows' (0028,0010) (US): 'abc' is not an "
                                       "integer in 0..65535"),
        ({"Replace": {"Rows": 3}}, "Replace: tag 'Rows' (0028,0010) (US): expected a string"),
        ({"Replace": {"SOPClassUID": None}}, "Replace: 'SOPClassUID' (0008,0016) must be given "
                                             "as a string"),
        ({"Replace": {"EncryptedContent": "data:application/octet-stream;base64,%%"}},
         "malformed base64"),
        ({"Transcode": "1.2.3"}, "Transcode: '1.2.3' is not a supported transfer syntax UID; "
                                 "allowed: "),
        ({"Level": "Galaxy"}, "Level: expected one of Patient, Study, Series, Instance (got 'Galaxy')"),
        ({"Resources": "abc"}, "Resources: expected an array of non-empty strings"),
        ({"Resources": [""]}, "Resources: expected an array of non-empty strings"),
        ({"Priority": "high"}, "Priority: expected an integer, got string"),
        ({"Replace": {"MediaStorageSOPInstanceUID": "1.2"}},
         "Replace: 'MediaStorageSOPInstanceUID' (0002,0003) belongs to the file meta header"),
        ({"Replace": {"DimensionIndexSequence[1].TransferSyntaxUID": "1.2.840.10008.1.2"}},
         "Replace 'DimensionIndexSequence[1].TransferSyntaxUID': 'TransferSyntaxUID' (0002,0010) belongs to "
         "the file meta header, which never stands inside a sequence item"),
        ({"Replace": {"ReferencedStudySequence": [{"ReferencedSOPInstanceUID": "1.3"}, {"0002,0013": "X"}]}},
         "Replace: tag 'ReferencedStudySequence' (0008,1110) (SQ): item 1 names 'ImplementationVersionName' "
         "(0002,0013), an element of the file meta header, which never stands inside a sequence item"),
        ({"Dictionary": {"4321,1012": "LO"}}, "Dictionary: entry '4321,1012' must be"),
        ({"Replace": {"DimensionIndexSequence[0].Rows": "x"}},
         "Replace 'DimensionIndexSequence[0].Rows': tag 'Rows' (0028,0010) (US): 'x' is not"),
    ],
)
def test_modify_refusals(body, message):
    _refused(parse_modify, body, message)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # FD/OD: a decimal beyond a double's range becomes inf in Python; Orthanc says out of range
        ('{"Replace": {"0018,9087": "1e400"}}', "Replace: tag 'DiffusionBValue' (0018,9087) (FD): "
                                                "'1e400' is not a 64-bit float"),
        ('{"Replace": {"DiffusionBValue": "-2e308"}}', "'-2e308' is not a 64-bit float"),
        # str.isdigit() takes superscripts and other scripts' digits; int() then fails or reads '٣' as 3
        ('{"Remove": ["ReferencedImageSequence[\\u00b2].StudyDate"]}',
         "Remove: bad path 'ReferencedImageSequence[\u00b2].StudyDate': index '\u00b2' must be a "
         "non-negative integer (at most 9 digits) or *"),
        ('{"Remove": ["ReferencedImageSequence[\\u0663].StudyDate"]}', "index '\u0663' must be"),
        ('{"Keep": ["ReferencedImageSequence[1234567890].StudyDate"]}', "index '1234567890' must be"),
        # JSON's "\ud800" parses to a lone surrogate, which no encoding can write
        ('{"Replace": {"EncryptedContent": "\\ud800"}}',
         "Replace: tag 'EncryptedContent' (0400,0520) (OB): the value holds an unpaired surrogate"),
        ('{"Replace": {"StationName": "a\\udfffb"}}', "(SH): the value holds an unpaired surrogate"),
        # item and delimiter tags are not data elements (Orthanc answers 500 or crashes)
        ('{"Replace": {"FFFE,E000": ""}}', "Replace: 'FFFE,E000' is an item or delimiter tag (group FFFE)"),
        ('{"Remove": ["fffe,e0dd"]}', "Remove: 'fffe,e0dd' is an item or delimiter tag"),
        # Orthanc embeds image/PDF data URIs; we would store the URI text as pixels: refused
        ('{"Replace": {"PixelData": "data:image/png;base64,aGVsbG8="}}',
         "Replace: tag 'PixelData' (7FE0,0010) (OB or OW): only 'data:application/octet-stream;"
         "base64,...' values are supported here (no image or PDF embedding)"),
        ('{"Replace": {"EncapsulatedDocument": "data:application/pdf;base64,aGVsbG8="}}',
         "tag 'EncapsulatedDocument' (0042,0011) (OB): only 'data:application/octet-stream"),
        ('{"Replace": {"StationName": "data:application/octet-stream;base64,aGVsbG8x9"}}',
         "malformed base64"),  # 9 characters: no padding can complete it
    ],
)
def test_modify_refusals_found_against_orthanc(body, message):
    _refused(parse_modify, json.loads(body), message)


def test_unpadded_base64_retired_keywords_and_plain_text_data_uris_are_accepted():
    plan = parse_modify({"Replace": {"StationName": "data:application/octet-stream;base64,aGVsbG8",
                                     "EncryptedContent": "data:application/octet-stream;base64,AQID",
                                     "InstitutionName": "data:image/png;base64,xyz"},
                         "Remove": ["RETIRED_OtherPatientIDs", "RETIRED_StudyComments"]})
    values = {v.tag: v.value for v in plan.replacements}
    assert values[STATION] == "hello"
    assert values[0x04000520] == b"\x01\x02\x03\x00"
    assert values[INSTITUTION] == "data:image/png;base64,xyz"  # text VRs store the text, as Orthanc
    assert {0x00101000, 0x00324000} <= set(plan.removals)


def test_unknown_keys_are_refused_with_the_allowed_list():
    message = _refused(parse_modify, {"Repalce": {}, "DicomVersion": "2008"},
                       "unknown keys 'DicomVersion', 'Repalce' in the modify request; allowed "
                       "keys: Asynchronous, Dictionary, Force, Keep, KeepLabels, KeepSource, "
                       "Level, Permissive, Priority, PrivateCreator, Remove, RemovePrivateTags, "
                       "Replace, Resources, Synchronous, Transcode")
    assert "KeepPrivateTags" not in message
    _refused(parse_anonymize, {"RemovePrivateTags": True},
             "unknown key 'RemovePrivateTags' in the anonymize request; allowed keys: "
             "Asynchronous, DicomVersion, Dictionary, Force, Keep, KeepLabels, KeepPrivateTags")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"DicomVersion": "nope"}, "DicomVersion: 'nope' is not supported; allowed: \"2008\", "
                                   "\"2017c\", \"2021b\", \"2023b\""),
        ({"DicomVersion": 2008}, "DicomVersion: expected a string, got number"),
        ({"KeepPrivateTags": "true"}, "KeepPrivateTags: expected true or false, got string"),
        ({"KeepPrivateTags": None}, "KeepPrivateTags: expected true or false, got null"),
        ({"DicomVersion": None}, "DicomVersion: expected a string, got null; allowed: \"2008\", "
                                 "\"2017c\", \"2021b\", \"2023b\" (leave it out for 2023b)"),
        ({"Level": None}, "Level: expected one of Patient, Study, Series, Instance (got null)"),
        ({"Keep": ["StudyInstanceUID"]}, "Keep: marking tag 'StudyInstanceUID' (0020,000D) as "
                                         "to be kept requires the \"Force\" option"),
        ({"Replace": {"SeriesInstanceUID": "1.2"}}, "as to be replaced requires the \"Force\""),
        ({"Level": 3}, "Level: expected one of Patient, Study, Series, Instance (got number)"),
        # Orthanc's anonymization reads replaced Study/Series UIDs as strings
        ({"Replace": {"StudyInstanceUID": None}, "Force": True},
         "Replace: 'StudyInstanceUID' (0020,000D) must be given as a string, got null"),
        ({"Replace": {"SeriesInstanceUID": None}, "Remove": ["SeriesInstanceUID"], "Force": True},
         "'SeriesInstanceUID' (0020,000E) must be given as a string, got null"),
    ],
)
def test_anonymize_refusals(body, message):
    _refused(parse_anonymize, body, message)


def test_nested_values_orthanc_drops_or_reads_freely():
    """Orthanc 1.10.1 drops elements of groups no data set holds (0000, 0001-0007 odd, FFFF)
    from nested paths and sequence items, as our writer drops them at top level; and only the
    top-level SOP UIDs must be strings: a nested one may be null (checked against it)."""
    plan = parse_modify({"Replace": {
        "DimensionIndexSequence[1].0000,0900": "1", "DimensionIndexSequence[1].0001,0010": "x",
        "DimensionIndexSequence[1].0007,0010": "x", "DimensionIndexSequence[1].FFFF,0010": "x",
        "DimensionIndexSequence[1].SOPInstanceUID": None, "DimensionIndexSequence[0].SOPClassUID": None,
        "ReferencedStudySequence": [{"0000,0900": "1", "0003,0010": "x", "ReferencedSOPInstanceUID": "1.3"}],
    }})
    assert [(str(path), value) for path, value in plan.replace_paths] == [
        ("(0020,9222)[0].(0008,0016)", Value(0x00080016, "UI", None)),
        ("(0020,9222)[1].(0008,0018)", Value(0x00080018, "UI", None)),
    ]
    assert plan.replacements == (Value(0x00081110, "SQ", ((Value(0x00081155, "UI", "1.3"),),)),)


# ---------------------------------------------------------------- plans

def test_modify_plan_contents_and_pickling():
    plan = parse_modify({
        "Replace": {"PatientName": "hello", "0008-0080": None,
                    "ReferencedImageSequence[*].ReferencedSOPClassUID": "1.2"},
        "Remove": ["StationName", "PerformedProtocolCodeSequence[0].CodeValue"],
        "Keep": ["ContentSequence[1].TextValue"],
        "RemovePrivateTags": True, "Transcode": "1.2.840.10008.1.2.1",
        "Resources": ["abc"], "KeepSource": False, "Synchronous": True, "Priority": 3,
    })
    assert plan.operation == "modify" and not plan.is_anonymization
    assert plan.level == "Instance"
    assert plan.removals == {STATION}
    assert plan.replacements == (Value(INSTITUTION, "LO", None),
                                 Value(PATIENT_NAME, "PN", "hello"))
    assert [str(p) for p in plan.remove_paths] == ["(0040,0260)[0].(0008,0100)"]
    assert [(str(p), v) for p, v in plan.replace_paths] == \
        [("(0008,1140)[*].(0008,1150)", Value(0x00081150, "UI", "1.2"))]
    assert [str(p) for p in plan.keep_paths] == ["(0040,a730)[1].(0040,a160)"]
    assert plan.remove_private_tags
    assert plan.transcode == "1.2.840.10008.1.2.1"
    assert plan.resources == ("abc",)
    assert plan.keep_source is False
    assert plan.profile_version is None
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert plan.describe() == ("modify; level Instance; Replace 2+1 paths; Remove 1+1 paths; "
                               "Keep 1; private tags removed; Transcode 1.2.840.10008.1.2.1")


def test_precedence_keep_beats_replace_beats_remove():
    plan = parse_modify({"Remove": ["StationName", "InstitutionName", "StudyDate"],
                         "Replace": {"StationName": "S", "InstitutionName": "I"},
                         "Keep": ["InstitutionName"]})
    assert plan.removals == {STUDY_DATE}
    assert plan.replacements == (Value(STATION, "SH", "S"),)
    assert plan.keep == {INSTITUTION}


def test_two_spellings_of_one_tag_later_sorted_name_wins():
    plan = parse_modify({"Replace": {"StationName": "by-name", "0008,1010": "by-hex"}})
    # Orthanc visits names in sorted order: "0008,1010" < "StationName".
    assert plan.replacements == (Value(STATION, "SH", "by-name"),)


def test_only_surviving_replace_values_are_cast():
    # Orthanc casts the values left after Keep and later spellings: the others are not checked.
    plan = parse_modify({"Replace": {"Rows": "abc", "0028,0011": "abc", "Columns": "7",
                                     "SOPClassUID": None}, "Keep": ["Rows", "SOPClassUID"]})
    assert plan.replacements == (Value(0x00280011, "US", (7,)),)
    _refused(parse_modify, {"Replace": {"Rows": "abc", "0028,0010": "5"}}, "'abc' is not an integer")
    kept = parse_anonymize({"Replace": {"StudyInstanceUID": None}, "Keep": ["StudyInstanceUID"],
                            "Force": True})
    assert 0x0020000D in kept.keep and 0x0020000D not in kept.replaced_tags
    assert parse_modify({"Replace": {"StudyInstanceUID": None}, "Force": True}).replacements == (
        Value(0x0020000D, "UI", None),)


@pytest.mark.parametrize(
    ("body", "level"),
    [
        ({}, "Instance"),
        ({"Replace": {"SeriesInstanceUID": "1"}, "Force": True}, "Series"),
        ({"Replace": {"StudyInstanceUID": "1", "SeriesInstanceUID": "2"}, "Force": True}, "Study"),
        ({"Replace": {"PatientID": "p", "StudyInstanceUID": "1"}, "Force": True}, "Patient"),
        ({"Replace": {"PatientID": "p"}, "Force": True, "Keep": ["PatientID"]}, "Instance"),
        ({"Level": "studies"}, "Study"),
        ({"Level": "IMAGE"}, "Instance"),
        ({"Level": "Series", "Replace": {"StudyInstanceUID": "1"}, "Force": True}, "Series"),
    ],
)
def test_level_detection(body, level):
    assert parse_modify(body).level == level


def test_level_argument_overrides_and_patient_level_needs_patient_id():
    assert parse_modify({"Level": "Series"}, level="study").level == "Study"
    _refused(parse_modify, {"Replace": {"PatientName": "x"}},
             "Replace: modifying at the Patient level requires PatientID in Replace", level="Patient")
    _refused(parse_modify, {"Level": "Patients"},
             "Replace: modifying at the Patient level requires PatientID in Replace")
    # With Force, Orthanc >= 1.11.3 renames a patient in place (test_rename_patient_...).
    assert parse_modify({"Replace": {"PatientName": "TOTO"}, "Force": True},
                        level="Patient").level == "Patient"
    assert parse_level("Instances") == "Instance"


def test_forced_database_keys_and_nested_paths_need_no_force():
    plan = parse_modify({"Replace": {"SOPInstanceUID": "instance"}, "Keep": ["StudyInstanceUID"],
                         "Force": True})
    assert plan.force and plan.forced_uids == {SOP_UID} and plan.keep == {STUDY_UID}
    nested = parse_modify({"Replace": {"ReferencedSeriesSequence[0].SeriesInstanceUID": "1.2"},
                           "Remove": ["ReferencedSeriesSequence[*].StudyInstanceUID"]})
    assert not nested.replacements and len(nested.replace_paths) == 1


def test_private_creator_and_dictionary_from_body_or_argument():
    config = {"4321,1012": ["LO", "RadioButton3", 1, 1, "RadioLogic"]}
    body = {"Replace": {"RadioButton3": "aaabbbccc"}, "PrivateCreator": "RadioLogic"}
    from_argument = parse_modify(body, dictionary=config)
    from_body = parse_modify({**body, "Dictionary": config})
    assert from_argument.replacements == from_body.replacements == \
        (Value(0x43211012, "LO", "aaabbbccc"),)
    assert from_argument.private_creator == "RadioLogic"
    _refused(parse_modify, body, "Replace: unknown tag 'RadioButton3'")


def test_group_lengths_are_ignored_in_replace():
    plan = parse_modify({"Replace": {"0008,0000": "12", "(0008,0000)[0].PatientName": "x"}})
    assert plan.replacements == () and plan.replace_paths == ()


def test_transcode_accepts_orthanc_syntaxes():
    for uid in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70"):
        assert parse_modify({"Transcode": uid}).transcode == uid


# ---------------------------------------------------------------- anonymization plans

def test_anonymize_default_plan():
    plan = parse_anonymize({})
    assert plan.operation == "anonymize" and plan.is_anonymization
    assert plan.level == "Patient" and plan.profile_version == "2023b"
    assert plan.remove_private_tags and not plan.customised
    assert {PATIENT_ID, PATIENT_NAME} <= plan.uids
    assert STUDY_DATE in plan.clearings and STATION in plan.removals
    replacements = {v.tag: v for v in plan.replacements}
    assert replacements[0x00120062] == Value(0x00120062, "CS", "YES")
    assert replacements[0x00120063].value == \
        f"dicom-deid {__version__} - PS 3.15-2023b Table E.1-1 Basic Profile"
    code = replacements[0x00120064]
    assert code.value == ((Value(0x00080100, "SH", "113100"), Value(0x00080102, "SH", "DCM"),
                           Value(0x00080104, "LO", "Basic Application Confidentiality Profile")),)
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert plan.describe() == ("anonymize; DicomVersion 2023b; level Patient; Replace 3+0 paths; "
                               "private tags removed")


@pytest.mark.parametrize(
    ("version", "method"),
    [("2008", "PS 3.15-2008 Table E.1-1"), ("2017c", "PS 3.15-2017c Table E.1-1 Basic Profile"),
     ("2021b", "PS 3.15-2021b Table E.1-1 Basic Profile")],
)
def test_anonymize_method_per_version(version, method):
    plan = parse_anonymize({"DicomVersion": version})
    assert plan.profile_version == version
    assert {v.tag: v.value for v in plan.replacements}[0x00120063] == \
        f"dicom-deid {__version__} - {method}"


@pytest.mark.parametrize(
    "body",
    [{"Replace": {"StationName": "tutu"}}, {"Keep": ["StudyDescription"]},
     {"Remove": ["Modality"]}, {"KeepPrivateTags": True},
     {"Remove": ["ReferencedImageSequence[*].ReferencedSOPClassUID"]}],
)
def test_customised_anonymization_names_only_the_product(body):
    replacements = {v.tag: v.value for v in parse_anonymize(body).replacements}
    assert replacements[0x00120063] == f"dicom-deid {__version__}"
    assert 0x00120064 not in replacements


def test_anonymize_user_entries_move_tags_between_sets():
    plan = parse_anonymize({"Keep": ["StudyDate", "PatientName", "00e1,10c2"],
                            "Replace": {"StationName": "S", "FrameOfReferenceUID": "1.2"},
                            "Remove": ["Modality"]})
    assert STUDY_DATE not in plan.clearings and STUDY_DATE in plan.keep
    assert PATIENT_NAME not in plan.uids
    assert 0x00E110C2 in plan.private_keep
    assert STATION not in plan.removals
    assert 0x00200052 not in plan.uids  # replaced UIDs leave the map (Orthanc §4.4)
    assert 0x00080060 in plan.removals
    # Emptying the method tag explicitly is respected (no product text written).
    emptied = parse_anonymize({"Replace": {"DeidentificationMethod": None}})
    assert {v.tag: v.value for v in emptied.replacements}[0x00120063] is None
