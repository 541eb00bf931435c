"""The example bodies in configs/ stay valid requests (they are what newcomers copy)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO
from tests.pipeline_support import write_key
from transforms import request

CONFIGS = sorted((REPO / "configs").glob("*.json"))


def test_there_are_examples():
    assert {p.name for p in CONFIGS} >= {"anonymize-2023b.json", "modify-example.json"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    body = json.loads(path.read_text())
    parse = request.parse_anonymize if path.name.startswith("anonymize") else request.parse_modify
    plan = parse(body)
    assert plan.operation == ("anonymize" if path.name.startswith("anonymize") else "modify")
    if plan.is_anonymization:
        assert plan.profile_version == "2023b"


def test_the_modify_example_writes_a_private_tag_with_its_creator(tmp_path):
    """Neither Orthanc nor we insert a private creator element (gggg,00xx) for a replaced private
    tag: the example replaces both, so its output is a well-formed private block."""
    import pydicom
    from pydicom.data import get_testdata_file

    from pipelines import cli

    out = tmp_path / "out.dcm"
    assert cli.main(["modify", get_testdata_file("CT_small.dcm"), str(out), "--config",
                     str(REPO / "configs" / "modify-example.json"), "--key-file", str(write_key(tmp_path))]) == 0
    ds = pydicom.dcmread(out)
    block = ds.private_block(0x4321, "RadioLogic")
    assert (ds[0x43210010].VR, ds[0x43210010].value) == ("LO", "RadioLogic")
    assert (block[0x12].tag, block[0x12].VR, block[0x12].value) == (0x43211012, "LO", "Yes")
    assert (ds.StudyDescription, ds.InstitutionName) == ("Re-labelled", "")  # null empties
