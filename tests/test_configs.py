"""The example bodies in configs/ stay valid requests (they are what newcomers copy)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO
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
