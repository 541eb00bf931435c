"""dcmodify-style paths (orthanc-behavior.md §2.5): grammar, keep matching, copy-on-write edits."""

from __future__ import annotations

import re

import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement

from transforms import dicomio
from transforms.errors import RequestError
from transforms.paths import TagPath, Workspace, parse_path, remove_at, replace_at, shallow_copy


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("PatientName", "(0010,0010)"),
        ("DimensionIndexSequence[1].DimensionDescriptionLabel", "(0020,9222)[1].(0020,9421)"),
        ("DimensionIndexSequence[*].PatientName", "(0020,9222)[*].(0010,0010)"),
        ("ReferencedImageEvidenceSequence[2].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]"
         ".ReferencedSOPInstanceUID", "(0008,9092)[2].(0008,1115)[0].(0008,1199)[0].(0008,1155)"),
        ("PerFrameFunctionalGroupsSequence[*].2005,140f[*].SOPInstanceUID",
         "(5200,9230)[*].(2005,140f)[*].(0008,0018)"),
        ("(5200,9230)[*].2005,140f[*].(0008,0023)", "(5200,9230)[*].(2005,140f)[*].(0008,0023)"),
        (" ReferencedImageSequence [ 3 ] . ReferencedSOPClassUID ", "(0008,1140)[3].(0008,1150)"),
    ],
)
def test_parse_and_canonical_form(text, canonical):
    assert str(parse_path(text, key="Keep")) == canonical


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("ReferencedImageSequence.ReferencedSOPClassUID", "has no [index]"),
        ("ReferencedImageSequence[0.ReferencedSOPClassUID", "is missing ']'"),
        ("ReferencedImageSequence[-1].ReferencedSOPClassUID", "must be a non-negative integer"),
        ("ReferencedImageSequence[a].ReferencedSOPClassUID", "must be a non-negative integer"),
        ("[0].ReferencedSOPClassUID", "empty tag name"),
        ("ReferencedImageSequence[0].", "empty tag name"),
        ("ReferencedImageSequence[0]", "the last element cannot have an index"),
    ],
)
def test_malformed_paths_are_refused(text, why):
    with pytest.raises(RequestError, match=re.escape(f"Remove: bad path {text!r}: ") + ".*"
                       + re.escape(why)):
        parse_path(text, key="Remove")


def test_unknown_tag_in_path_names_key_and_tag():
    with pytest.raises(RequestError, match=re.escape("Keep: unknown tag 'NoSuchSequence'")):
        parse_path("NoSuchSequence[0].PatientName", key="Keep")


def test_keep_matching_rules():
    pattern = parse_path("A[*].B".replace("A", "ReferencedSeriesSequence")
                         .replace("B", "ReferencedSOPSequence"), key="Keep")
    series, sop, uid = 0x00081115, 0x00081199, 0x00081155
    assert pattern.matches(((series, 0),), sop)  # the element itself
    assert pattern.matches(((series, 3), (sop, 1)), uid)  # inside its subtree
    assert not pattern.matches(((series, 0),), uid)  # a sibling
    assert not pattern.matches((), series)  # the parent is not protected
    indexed = TagPath(((series, 1),), sop)
    assert indexed.matches(((series, 1), (sop, 0)), uid)
    assert not indexed.matches(((series, 0), (sop, 0)), uid)
    top = TagPath((), series)
    assert top.matches((), series) and top.matches(((series, 5),), uid)


def test_group_length_paths_are_flagged():
    assert parse_path("0008,0000", key="Replace").touches_group_length()
    assert parse_path("(0008,0000)[0].PatientName", key="Replace").touches_group_length()
    assert not parse_path("PatientName", key="Replace").touches_group_length()


ROI_NAME, ROI_NUMBER = 0x30060026, 0x30060022


def _rtstruct():
    with open(get_testdata_file("rtstruct.dcm"), "rb") as f:  # no preamble, implicit VR
        return dicomio.read_dataset(f.read(), check_uids=False)


def test_edits_copy_on_write_and_never_create_items():
    source = _rtstruct()
    before = dicomio.write_dataset(source)
    out = shallow_copy(source)
    ws = Workspace(out)
    rois = parse_path("StructureSetROISequence[*].ROIName", key="Replace")
    replace_at(ws, out, rois, lambda _: DataElement(ROI_NAME, "LO", "X"))
    remove_at(ws, out, parse_path("StructureSetROISequence[0].ROINumber", key="Remove"))
    # Index beyond the items and a missing sequence: nothing happens, no error.
    replace_at(ws, out, parse_path("StructureSetROISequence[9].ROIName", key="Replace"),
               lambda _: DataElement(ROI_NAME, "LO", "Y"))
    remove_at(ws, out, parse_path("ReferencedImageSequence[*].ReferencedSOPClassUID",
                                  key="Remove"))
    assert [item.ROIName for item in out.StructureSetROISequence] == ["X", "X", "X"]
    assert "ROINumber" not in out.StructureSetROISequence[0]
    assert [item.ROINumber for item in out.StructureSetROISequence[1:]] == [2, 3]
    assert "ReferencedImageSequence" not in out
    # The input is byte-for-byte what it was, and its items were not touched.
    assert dicomio.write_dataset(source) == before
    assert [item.ROIName for item in source.StructureSetROISequence] == \
        ["patient", "Isocenter 1", "Isocenter 2"]
    assert source.StructureSetROISequence[0].ROINumber == 1


def test_edits_on_an_already_decoded_input_copy_the_shared_items():
    source = _rtstruct()
    names = [item.ROIName for item in source.StructureSetROISequence]  # decoded in place
    out = shallow_copy(source)
    ws = Workspace(out)
    replace_at(ws, out, parse_path("StructureSetROISequence[1].ROIName", key="Replace"),
               lambda _: DataElement(ROI_NAME, "LO", "Z"))
    assert [item.ROIName for item in out.StructureSetROISequence] == [names[0], "Z", names[2]]
    assert [item.ROIName for item in source.StructureSetROISequence] == names
    assert out.StructureSetROISequence[0] is not source.StructureSetROISequence[0]
