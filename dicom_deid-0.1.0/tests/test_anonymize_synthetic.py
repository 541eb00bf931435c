"""No planted PHI and no original UID survives anonymization, searched in the output bytes."""

from __future__ import annotations

import pytest

from transforms import dicomio
from transforms.engine import apply
from transforms.identity import Key
from transforms.request import parse_anonymize

from .synthetic import PLANTED, dataset_bytes, expected_survivors, make_study, original_uids

SECRET = b"synthetic-test-key-0123456789"
KEY = Key.from_bytes(SECRET)


@pytest.fixture(scope="module")
def study():
    return make_study(seed=7, n_ct=3)


def _anonymized_bytes(study, body: dict, key: Key = KEY) -> bytes:
    plan = parse_anonymize(body)
    outputs = []
    for ds in study:
        source = dicomio.read_dataset(dataset_bytes(ds))
        outputs.append(dicomio.write_dataset(apply(plan, source, key)))
    return b"\n".join(outputs)


@pytest.mark.parametrize("version", ["2008", "2017c", "2021b", "2023b"])
def test_nothing_planted_survives_except_what_the_profile_keeps(study, version):
    blob = _anonymized_bytes(study, {"DicomVersion": version})
    values = [*PLANTED, *sorted(original_uids(study))]
    survivors = {value for value in values if value.encode("utf-8") in blob}
    expected = expected_survivors(study, version)
    assert survivors == expected
    if version != "2008":
        # Everything planted in 2017c+ is removed, cleared or remapped somewhere.
        assert not any(uid in survivors for uid in original_uids(study))


def test_keep_private_tags_lets_private_values_through_but_still_maps_their_uids(study):
    blob = _anonymized_bytes(study, {"KeepPrivateTags": True})
    assert b"Private planted note" in blob and b"PLANTED-OB-BYTES" in blob
    # A UID in a private UI element is still the original (private tags are not mapped) ...
    survivors = {uid for uid in original_uids(study) if uid.encode() in blob}
    assert survivors == {study[0].StudyInstanceUID}
    # ... but the PatientName planted inside a private sequence is pseudonymized.
    assert b"PLANTEDFAMILY" not in blob


def test_the_same_key_gives_the_same_bytes_on_a_rerun(study):
    """A rerun loads the key again: two Key objects from the same bytes, so nothing comes from
    the first run's cache."""
    first = _anonymized_bytes(study, {}, Key.from_bytes(SECRET))
    assert _anonymized_bytes(study, {}, Key.from_bytes(SECRET)) == first
    assert _anonymized_bytes(study, {}, Key.from_bytes(SECRET + b"x")) != first
