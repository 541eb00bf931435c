"""Split and merge compared tag by tag with Orthanc 1.10.1's /studies/{id}/split and /merge.

Both sides get the same body. Regenerated UIDs are compared by structure (``UidStructure``): a
bijection between Orthanc's new values and ours, so "one new study, one new series per source
series, one new SOP per instance" is checked without equal values. Skipped without Orthanc.
"""

from __future__ import annotations


import pytest

from tests.compare import (
    KEY_BYTES,
    WRITER_DIFFERENCES,
    UidStructure,
    collect_identifiers,
    compare_datasets,
    deliberate,
    judge,
    read,
)
from tests.conftest import sample
from tests.orthanc_ref import OrthancClient, orthanc, orthanc_process  # noqa: F401 - fixtures
from tests.test_split_synthetic import CT_SERIES, RT_SERIES, STUDY_A, make_reference_studies
from transforms import splitmerge as sm
from transforms.dicomio import read_dataset, write_dataset
from transforms.identity import Key

pytestmark = pytest.mark.orthanc

DELIBERATE_DIFFERENCES = [
    *WRITER_DIFFERENCES,
    deliberate(0, ["uid-structure"], "nested", mask=0, detail="Orthanc kept the original identifier, we changed it",
               reason="references among moved instances follow their new UIDs (an RTSTRUCT moved with its CT "
                      "still resolves); Orthanc's split/merge changes only the three top-level UIDs"),  # fmt: skip
]


def ours(plan: sm.Plan, source: str, data: bytes) -> object:
    return read(write_dataset(sm.apply_plan(plan, read_dataset(data), source)))


def new_instances(orthanc: OrthancClient, study: str, before: set[str]) -> list[bytes]:
    return [orthanc.instance_file(i) for i in orthanc.study_instances(study) if i not in before]


def test_split_matches_orthanc(orthanc: OrthancClient) -> None:
    """Orthanc's test_split: Knee T1-1 and T2-1; T2 goes to a new study with Replace/Remove."""
    files = {rel: sample(rel).read_bytes() for rel in ("Knee/T1/IM-0001-0001.dcm", "Knee/T2/IM-0001-0001.dcm")}
    study, by_id = orthanc.upload_study(files)
    t2 = next(i for i, rel in by_id.items() if "T2" in rel)
    body = {"Series": [orthanc.instance_parent(t2, "series")], "Replace": {"PatientName": "Hello"},
            "Remove": ["ReferringPhysicianName"], "KeepSource": True}  # fmt: skip
    job = orthanc.run_job("studies", study, "split", body)
    try:
        assert job["InstancesCount"] == 1 and job["FailedInstancesCount"] == 0
        [reference] = [read(f) for f in new_instances(orthanc, job["TargetStudy"], set())]
        index = [sm.index_entry(rel, read_dataset(data)) for rel, data in files.items()]
        plan = sm.plan_split(index, sm.parse_split(study, {**body, "Synchronous": True}), Key.from_bytes(KEY_BYTES))
        mine = ours(plan, "Knee/T2/IM-0001-0001.dcm", files["Knee/T2/IM-0001-0001.dcm"])
        assert (mine.PatientName, reference.PatientName) == ("Hello", "Hello")
        assert plan.study_id != study and job["TargetStudy"] != study
        uids = UidStructure(collect_identifiers(read(d) for d in files.values()))
        judge([("Knee T2 split", compare_datasets(mine, reference, uids=uids, where="T2"))], DELIBERATE_DIFFERENCES)
    finally:
        orthanc.delete("studies", job["TargetStudy"])


def test_merge_matches_orthanc(orthanc: OrthancClient) -> None:
    """Orthanc's test_merge_instances: Knee T1-1 joins a one-instance Brainix study."""
    brainix_rel, knee_rel = "Brainix/Flair/IM-0001-0001.dcm", "Knee/T1/IM-0001-0001.dcm"
    files = {rel: sample(rel).read_bytes() for rel in (brainix_rel, knee_rel)}
    brainix_study, _ = orthanc.upload_study({brainix_rel: files[brainix_rel]})
    knee = orthanc.upload_once(files[knee_rel])
    before = set(orthanc.study_instances(brainix_study))
    body = {"Resources": [knee], "KeepSource": True}
    job = orthanc.run_job("studies", brainix_study, "merge", body)
    try:
        assert job["InstancesCount"] == 1 and job["FailedInstancesCount"] == 0
        [reference] = [read(f) for f in new_instances(orthanc, brainix_study, before)]
        index = [sm.index_entry(rel, read_dataset(d), study_tags_for=brainix_study) for rel, d in files.items()]
        plan = sm.plan_merge(index, sm.parse_merge(brainix_study, body), Key.from_bytes(KEY_BYTES))
        mine = ours(plan, knee_rel, files[knee_rel])
        assert mine.PatientName == reference.PatientName == "BRAINIX"
        uids = UidStructure(collect_identifiers(read(d) for d in files.values()))
        judge([("Knee T1 merged into Brainix", compare_datasets(mine, reference, uids=uids, where="merged"))],
              DELIBERATE_DIFFERENCES)  # fmt: skip
    finally:
        for instance in set(orthanc.study_instances(brainix_study)) - before:
            orthanc.delete("instances", instance)


def test_split_with_references_differs_only_where_we_follow_them(orthanc: OrthancClient) -> None:
    """A CT series and its RTSTRUCT split out of study A: Orthanc leaves the RTSTRUCT's nested
    references on the old UIDs; ours follow (the one deliberate difference)."""
    import io

    datasets = {name: ds for name, ds in make_reference_studies().items() if name.startswith("A/")}
    files = {}
    for name, ds in datasets.items():
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files[name] = buffer.getvalue()
    study, by_id = orthanc.upload_study(files)
    moved = {i: name for i, name in by_id.items() if "ct" in name or "rtstruct" in name}
    body = {"Instances": sorted(moved), "KeepSource": True}
    job = orthanc.run_job("studies", study, "split", body)
    try:
        references = {read(f).SOPClassUID.name + str(read(f).InstanceNumber): read(f)
                      for f in new_instances(orthanc, job["TargetStudy"], set())}  # fmt: skip
        index = [sm.index_entry(name, read_dataset(d)) for name, d in files.items()]
        plan = sm.plan_split(index, sm.parse_split(STUDY_A, {"Series": [CT_SERIES, RT_SERIES]}), Key.from_bytes(KEY_BYTES))
        assert len(references) == len(plan.moves) == 4
        uids = UidStructure(collect_identifiers(read(d) for d in files.values()))
        results = []
        for name in sorted(plan.moves):
            mine = ours(plan, name, files[name])
            reference = references[mine.SOPClassUID.name + str(mine.InstanceNumber)]
            results.append((name, compare_datasets(mine, reference, uids=uids, where=name)))
        differences = [d for _, found in results for d in found]
        assert {d.keyword for d in differences} == {"ReferencedSOPInstanceUID", "SeriesInstanceUID"}
        judge(results, DELIBERATE_DIFFERENCES)
    finally:
        orthanc.delete("studies", job["TargetStudy"])


def test_merging_comunix_into_brainix_matches_orthanc_tag_for_tag(orthanc: OrthancClient) -> None:
    """The issue's example: Comunix's CT and PET join Brainix's study. Nothing moved references
    another moved instance, so no deliberate difference applies: every tag matches Orthanc's
    (its MPPS reference, whose value equals Comunix's StudyInstanceUID, used to be rewritten as
    if it named the study)."""
    brainix_rel = "Brainix/Flair/IM-0001-0001.dcm"
    comunix = ("Comunix/Ct/IM-0001-0001.dcm", "Comunix/Ct/IM-0001-0002.dcm", "Comunix/Pet/IM-0001-0001.dcm")
    files = {rel: sample(rel).read_bytes() for rel in (brainix_rel, *comunix)}
    brainix_study, _ = orthanc.upload_study({brainix_rel: files[brainix_rel]})
    comunix_study, _ = orthanc.upload_study({rel: files[rel] for rel in comunix})
    before = set(orthanc.study_instances(brainix_study))
    body = {"Resources": [comunix_study], "KeepSource": True}
    job = orthanc.run_job("studies", brainix_study, "merge", body)
    try:
        assert job["InstancesCount"] == 3 and job["FailedInstancesCount"] == 0
        references = {(r.Modality, int(r.InstanceNumber)): r
                      for r in (read(f) for f in new_instances(orthanc, brainix_study, before))}  # fmt: skip
        index = [sm.index_entry(rel, read_dataset(d), study_tags_for=brainix_study) for rel, d in files.items()]
        plan = sm.plan_merge(index, sm.parse_merge(brainix_study, body), Key.from_bytes(KEY_BYTES))
        uids = UidStructure(collect_identifiers(read(d) for d in files.values()))
        results = []
        for rel in comunix:
            mine = ours(plan, rel, files[rel])
            reference = references[(mine.Modality, int(mine.InstanceNumber))]
            assert mine.ReferencedPerformedProcedureStepSequence[0].ReferencedSOPInstanceUID == \
                read(files[rel]).ReferencedPerformedProcedureStepSequence[0].ReferencedSOPInstanceUID
            results.append((rel, compare_datasets(mine, reference, uids=uids, where=rel)))
        assert len(results) == len(references) == 3
        judge(results, WRITER_DIFFERENCES)
    finally:
        for instance in set(orthanc.study_instances(brainix_study)) - before:
            orthanc.delete("instances", instance)
