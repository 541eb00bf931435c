"""Differential test: ``dicom-deid anonymize|modify`` with a ``Resources`` selection against a
live Orthanc 1.10.1's ``/tools/bulk-anonymize`` and ``/tools/bulk-modify``.

The same files are stored in Orthanc and copied into a folder; the same body, with the same
Orthanc ids in ``Resources`` (a mix of studies, series and instances, and files outside the
selection), goes to Orthanc's bulk route and to our command (the real command, DirectRunner,
audit read back). Compared:

- which source instances were processed (Orthanc: the ``ModifiedFrom`` / ``AnonymizedFrom``
  metadata of every new instance it lists; ours: the audit's written rows), and the counts;
- the summary's ``Resources`` against the job's: as many entries of each type, and the same
  ids wherever the level leaves that resource's identifiers as they were (Orthanc lists the
  unchanged parents of an Instance-level bulk modify too, behaviour §10.3), or the body sets
  them (a replaced PatientID);
- ``Transcode`` in the body: the job's and the summary's ``Transcode``, and every output's
  syntax (Orthanc 1.10.1 keeps JPEG 2000 sources it cannot decode, README);
- every output instance tag by tag against Orthanc's (``compare_datasets``), regenerated
  identifiers by structure over the whole request: Orthanc's bulk job uses one UID map for all
  its instances, ours one key, so a UID shared by two selected studies must stay shared.

Needs ``/usr/sbin/Orthanc`` (skipped otherwise) and ``../shared/dicom-samples``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pipelines import cli
from tests.compare import UidStructure, collect_identifiers, compare_datasets, deliberate, judge, read
from tests.conftest import sample
from tests.orthanc_ref import TEST_DICTIONARY, OrthancClient, orthanc, orthanc_process  # noqa: F401
from tests.pipeline_support import read_rows, write_key
from tests.test_orthanc_diff_anonymize import DELIBERATE_DIFFERENCES as ANONYMIZE_DELIBERATE
from tests.test_orthanc_diff_anonymize import PATIENT_NAME, forced_uid_differences
from tests.test_orthanc_diff_modify import DELIBERATE_DIFFERENCES as MODIFY_DELIBERATE

pytestmark = pytest.mark.orthanc

#: Three patients, four studies (Brainix: two series; Knee: two series; Comunix CT; the
#: structured reports with the MR they reference).
FILES = (
    "Brainix/Flair/IM-0001-0001.dcm", "Brainix/Flair/IM-0001-0002.dcm",
    "Brainix/Epi/IM-0001-0001.dcm", "Brainix/Epi/IM-0001-0002.dcm",
    "Knee/T1/IM-0001-0001.dcm", "Knee/T1/IM-0001-0002.dcm", "Knee/T2/IM-0001-0001.dcm",
    "Comunix/Ct/IM-0001-0001.dcm", "Comunix/Ct/IM-0001-0002.dcm",
    "HierarchicalAnonymization/StructuredReports/IM0",
    "HierarchicalAnonymization/StructuredReports/IM631",
)

#: In one bulk anonymization Orthanc names every patient alike ("Anonymized<N>", one N per
#: request); ours gives each patient its own keyed pseudonym (README, differences on purpose).
BULK_ANONYMIZE_DELIBERATE = [
    *ANONYMIZE_DELIBERATE,
    deliberate("PatientName", ["uid-structure"], "top",
               reason="one keyed pseudonym per patient; Orthanc gives every patient of a bulk "
                      "anonymization the same 'Anonymized<N>'"),
]

JPEG_2000 = "1.2.840.10008.1.2.4.91"
_ROUTE = {"Instance": "instances", "Series": "series", "Study": "studies", "Patient": "patients"}

#: Levels whose resources keep their identifiers, per (operation, level): their Orthanc ids
#: must be exactly Orthanc's.
_UNCHANGED = {"Instance": ("Series", "Study", "Patient"), "Series": ("Study", "Patient"),
              "Study": ("Patient",), "Patient": ()}


@dataclasses.dataclass(frozen=True)
class BulkCase:
    """``body`` without ``Resources``; ``select`` names (level, file) pairs: the Orthanc id of
    that file's resource at that level goes into ``Resources``. ``level``: the level Orthanc
    works at (given or detected); None for an anonymization. ``same_ids``: further resource
    types whose ids the body fixes (a replaced PatientID). ``counted_twice``: instances that
    two ``Resources`` entries cover (a series and one of its instances): Orthanc processes them
    once per entry and counts them so in ``InstancesCount``; we process every file once."""

    name: str
    operation: str  # 'anonymize' or 'modify'
    body: dict[str, Any]
    select: tuple[tuple[str, str], ...]
    level: str | None = None
    same_ids: tuple[str, ...] = ()
    counted_twice: int = 0


CASES = [
    BulkCase(  # TC-26-style: a study, a series of another patient, one instance of a third
        "anonymize-mixed-levels", "anonymize", {"DicomVersion": "2021b"},
        (("study", "Brainix/Flair/IM-0001-0001.dcm"), ("series", "Knee/T2/IM-0001-0001.dcm"),
         ("instance", "Comunix/Ct/IM-0001-0002.dcm"))),
    BulkCase(  # SR and the MR it references in one request: the reference must follow
        "anonymize-sr-with-evidence-2017c", "anonymize",
        {"DicomVersion": "2017c", "Keep": ["StudyDescription"]},
        (("study", "HierarchicalAnonymization/StructuredReports/IM0"),)),
    BulkCase(  # no identifier replaced: Instance level, new SOP Instance UIDs only
        "modify-detected-instance-level", "modify",
        {"Replace": {"InstitutionName": "bulk", "StudyDescription": "bulk study"},
         "Remove": ["StationName"]},
        (("series", "Knee/T1/IM-0001-0001.dcm"), ("instance", "Brainix/Epi/IM-0001-0002.dcm")),
        level="Instance"),
    BulkCase(
        "modify-series-level", "modify",
        {"Level": "Series", "Replace": {"SeriesDescription": "bulk series"}},
        (("study", "Knee/T1/IM-0001-0001.dcm"), ("series", "Comunix/Ct/IM-0001-0001.dcm")),
        level="Series"),
    BulkCase(  # Orthanc's level names are case-insensitive and plural forms are accepted
        "modify-studies-level", "modify",
        {"Level": "studies", "Replace": {"StudyDescription": "bulk"}, "Remove": ["AccessionNumber"]},
        (("study", "Brainix/Epi/IM-0001-0001.dcm"), ("instance", "Knee/T2/IM-0001-0001.dcm")),
        level="Study"),
    BulkCase(  # PatientID replaced: Patient level detected, the new patient's id is fixed
        "modify-detected-patient-level", "modify",
        {"Replace": {"PatientID": "bulk-patient", "PatientName": "Bulk^Patient"}, "Force": True},
        (("study", "Brainix/Flair/IM-0001-0001.dcm"), ("study", "Comunix/Ct/IM-0001-0001.dcm")),
        level="Patient", same_ids=("Patient",)),
    BulkCase(  # a study and one of its instances: that instance is in the output once
        "anonymize-overlapping-selection", "anonymize", {"DicomVersion": "2021b"},
        (("study", "Comunix/Ct/IM-0001-0001.dcm"), ("instance", "Comunix/Ct/IM-0001-0002.dcm")),
        counted_twice=1),
    BulkCase(
        "modify-overlapping-selection", "modify", {"Level": "Study", "Replace": {"StudyID": "7"}},
        (("series", "Brainix/Epi/IM-0001-0002.dcm"), ("instance", "Brainix/Epi/IM-0001-0002.dcm"),
         ("study", "Knee/T2/IM-0001-0001.dcm")),
        level="Study", counted_twice=1),
    BulkCase(  # Transcode in a job route: after the modification (native target: same pixel bytes)
        "modify-series-level-transcode", "modify",
        {"Level": "Series", "Replace": {"SeriesDescription": "implicit"}, "Transcode": "1.2.840.10008.1.2"},
        (("series", "Brainix/Flair/IM-0001-0001.dcm"), ("instance", "Knee/T2/IM-0001-0001.dcm")),
        level="Series"),
    BulkCase(
        "anonymize-transcode-big-endian", "anonymize",
        {"DicomVersion": "2017c", "Transcode": "1.2.840.10008.1.2.2"},
        (("study", "Brainix/Epi/IM-0001-0001.dcm"),)),
    BulkCase(  # a forced SeriesInstanceUID: the SR's evidence names the MR series (README)
        "anonymize-forced-series-uid", "anonymize",
        {"DicomVersion": "2021b", "Replace": {"SeriesInstanceUID": "1.2.3.2"}, "Force": True},
        (("study", "HierarchicalAnonymization/StructuredReports/IM0"),)),
]


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {relative: sample(relative).read_bytes() for relative in FILES}


def _orthanc_resource(orthanc: OrthancClient, level: str, instance: str) -> str:
    return instance if level == "instance" else orthanc.instance_parent(instance, level)


def _orthanc_side(orthanc: OrthancClient, case: BulkCase, files: dict[str, bytes]
                  ) -> tuple[dict[str, Any], dict[str, bytes], list[str]]:
    """(job content, {source label: Orthanc's result}, the Resources ids sent)."""
    orthanc.delete_all()  # the new instances of an earlier case must not join a selection
    label_of = {orthanc.upload_once(data): label for label, data in files.items()}
    instance_of = {label: instance for instance, label in label_of.items()}
    resources = [_orthanc_resource(orthanc, level, instance_of[label]) for level, label in case.select]
    body = {**case.body, "Resources": resources, "Synchronous": True}
    job = json.loads(orthanc.post_json(f"/tools/bulk-{case.operation}", body))
    origin = "AnonymizedFrom" if case.operation == "anonymize" else "ModifiedFrom"
    results = {}
    for entry in job["Resources"]:
        if entry["Type"] == "Instance":
            source = orthanc.metadata("instances", entry["ID"], origin)
            assert source in label_of, f"{entry['ID']} has no {origin} among the uploads"
            results[label_of[source]] = orthanc.instance_file(entry["ID"])
    orthanc.delete_all()  # leave no job output for the other modules' studies
    return job, results, resources


def _our_side(tmp_path: Path, case: BulkCase, files: dict[str, bytes], resources: list[str]
              ) -> tuple[int, dict[str, Any], dict[str, bytes], list[dict[str, Any]]]:
    """(exit status, summary, {source label: our output}, audit rows)."""
    folder = tmp_path / "in"
    for label, data in files.items():
        (folder / label).parent.mkdir(parents=True, exist_ok=True)
        (folder / label).write_bytes(data)
    config = tmp_path / "body.json"
    config.write_text(json.dumps({**case.body, "Resources": resources, "Dictionary": TEST_DICTIONARY}))
    output = tmp_path / "out"
    code = cli.main([case.operation, str(folder), str(output), "--config", str(config),
                     "--key-file", str(write_key(tmp_path)), "--quiet"])
    audit = Path(str(output) + "-audit")
    rows = read_rows(audit)
    ours = {Path(r["source_uri"]).relative_to(folder).as_posix(): Path(r["output_uri"]).read_bytes()
            for r in rows if r["status"] == "written"}
    return code, json.loads((audit / "summary.json").read_text()), ours, rows


def _by_type(resources: list[dict[str, str]]) -> dict[str, list[str]]:
    grouped = collections.defaultdict(list)
    for entry in resources:
        grouped[entry["Type"]].append(entry["ID"])
    return dict(grouped)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bulk_route_matches_orthanc(orthanc: OrthancClient, tmp_path: Path, files: dict[str, bytes],
                                    case: BulkCase) -> None:
    job, references, resources = _orthanc_side(orthanc, case, files)
    code, summary, ours, rows = _our_side(tmp_path, case, files, resources)

    # The same instances, all of them written; the rest skipped as not selected.
    assert job["FailedInstancesCount"] == 0 and code == 0
    assert sorted(ours) == sorted(references)
    assert (summary["InstancesCount"], summary["FailedInstancesCount"]) == (len(references), 0)
    assert job["InstancesCount"] == len(references) + case.counted_twice
    assert {r["reason"] for r in rows if r["status"] != "written"} <= {"not_selected"}
    assert summary["IsAnonymization"] is job["IsAnonymization"] is (case.operation == "anonymize")
    assert summary.get("Transcode") == job.get("Transcode") == case.body.get("Transcode")
    if "Transcode" in case.body:  # Orthanc 1.10.1 cannot decode JPEG 2000 (no GDCM plugin): its
        # job keeps such a file's syntax without a word (behaviour 9); ours transcodes it
        target = case.body["Transcode"]
        assert {read(data).file_meta.TransferSyntaxUID for data in ours.values()} == {target}
        for label in sorted(references):
            source_syntax = read(files[label]).file_meta.TransferSyntaxUID
            expected = source_syntax if source_syntax == JPEG_2000 else target
            assert read(references[label]).file_meta.TransferSyntaxUID == expected, label
        references = {label: data for label, data in references.items()
                      if read(files[label]).file_meta.TransferSyntaxUID != JPEG_2000}

    # The same resources: as many per type, the same ids where the identifiers are unchanged.
    theirs, mine = _by_type(job["Resources"]), _by_type(summary["Resources"])
    assert {t: len(v) for t, v in mine.items()} == {t: len(v) for t, v in theirs.items()}
    fixed = (_UNCHANGED[case.level] if case.level else ()) + case.same_ids
    for kind in ("Instance", "Series", "Study", "Patient"):
        if kind in fixed:
            assert mine[kind] == theirs[kind], kind
        else:
            assert not set(mine[kind]) & set(theirs[kind]), kind
    assert [e["Path"] for e in summary["Resources"]] == [f"/{_ROUTE[e['Type']]}/{e['ID']}" for e in summary["Resources"]]

    # Tag by tag, identifiers by structure over the whole request.
    structural = [PATIENT_NAME] if case.operation == "anonymize" else []
    uids = UidStructure(collect_identifiers((read(files[label]) for label in references), extra_tags=structural))
    compared = []
    for label in sorted(references):
        where = f"{label} [{case.name}]"
        compared.append((where, compare_datasets(read(ours[label]), read(references[label]), uids=uids,
                                                 structural_tags=structural, where=where,
                                                 anonymized=case.operation == "anonymize")))
    table = BULK_ANONYMIZE_DELIBERATE if case.operation == "anonymize" else MODIFY_DELIBERATE
    judge(compared, [*table, *forced_uid_differences(case.body)])


def test_bulk_cases_cover_every_level_and_both_operations() -> None:
    """The cases above exercise each level (given and detected) and each Resources level."""
    assert {c.level for c in CASES if c.operation == "modify"} == {"Instance", "Series", "Study", "Patient"}
    assert {level for c in CASES for level, _ in c.select} == {"study", "series", "instance"}
    assert {c.operation for c in CASES} == {"anonymize", "modify"}


def test_forced_uid_reaches_other_files_in_orthanc_only(orthanc: OrthancClient, tmp_path: Path,
                                                        files: dict[str, bytes]) -> None:
    """The README's "Forced UIDs across instances": with SeriesInstanceUID forced, the SR's
    evidence reference to the MR's series is the forced value in Orthanc's bulk output (its job
    met the MR first) and our keyed UID of the MR's original series (each file alone): the same
    UID the MR's series gets from an anonymization that does not force it."""
    [case] = [c for c in CASES if c.name == "anonymize-forced-series-uid"]
    sr, mr = "HierarchicalAnonymization/StructuredReports/IM0", "HierarchicalAnonymization/StructuredReports/IM631"
    job, references, resources = _orthanc_side(orthanc, case, files)
    _, _, ours, _ = _our_side(tmp_path / "forced", case, files, resources)
    _, _, unforced, _ = _our_side(tmp_path / "unforced", BulkCase("unforced", "anonymize", {"DicomVersion": "2021b"},
                                                                  case.select), files, resources)

    def evidence_series(data: bytes) -> list[str]:
        return [series.SeriesInstanceUID for item in read(data).CurrentRequestedProcedureEvidenceSequence
                for series in item.ReferencedSeriesSequence]

    assert read(files[sr]).CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID \
        == read(files[mr]).SeriesInstanceUID
    assert [read(references[label]).SeriesInstanceUID for label in (sr, mr)] == ["1.2.3.2", "1.2.3.2"]
    assert [read(ours[label]).SeriesInstanceUID for label in (sr, mr)] == ["1.2.3.2", "1.2.3.2"]
    assert evidence_series(references[sr]) == ["1.2.3.2"]
    assert evidence_series(ours[sr]) == [read(unforced[mr]).SeriesInstanceUID]
    assert read(unforced[mr]).SeriesInstanceUID.startswith("2.25.")
