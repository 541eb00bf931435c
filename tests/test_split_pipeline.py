"""``dicom-deid split`` end to end on the DirectRunner: files, audit rows, summary, refusals."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

import apache_beam as beam
from pipelines import cli
from pipelines import run as pipeline_run
from pipelines import splitmerge as psm
from schemas.audit import AUDIT_SCHEMA, CROSSWALK_SCHEMA
from tests.synthetic import make_study, write_study
from tests.test_split_synthetic import CT_SERIES, RT_SERIES, STUDY_A, STUDY_B, write_reference_studies
from transforms import files
from transforms import splitmerge as sm
from transforms import splitmerge_files as smf
from transforms.dicomio import read_dataset
from tests.conftest import SPLIT_MERGE_KEY_BYTES as KEY_BYTES
from transforms.errors import InputError
from transforms.identity import Key

KNEE_STUDY_ID = "0a9b3153-2512774b-2d9580de-1fc3dcf6-3bd83918"
KNEE_T2_UID = "1.3.46.670589.11.17521.5.0.3124.2008081909090037350"


def audit_rows(audit: Path) -> list[dict]:
    tables = [pq.read_table(p) for p in sorted(audit.glob("audit-*.parquet"))]
    assert tables and all(t.schema.equals(AUDIT_SCHEMA) for t in tables)
    return sorted((row for t in tables for row in t.to_pylist()), key=lambda r: r["source_uri"])


def statuses(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


def run(argv: list[str]) -> int:
    return cli.main([*argv, "--quiet"])


def test_split_knee_t2(samples: Path, tmp_path: Path, key_file: Path) -> None:
    out, audit = tmp_path / "out", tmp_path / "audit"
    body = {"Series": [KNEE_T2_UID], "Replace": {"PatientName": "Hello"}, "Remove": ["ReferringPhysicianName"]}
    argv = ["split", str(samples / "Knee"), str(out), "--study", KNEE_STUDY_ID, "--body", json.dumps(body),
            "--key-file", str(key_file), "--audit", str(audit), "--crosswalk", str(tmp_path / "cw")]  # fmt: skip
    assert run(argv) == 0
    rows = audit_rows(audit)
    assert statuses(rows) == {"moved": 26, "skipped": 24}
    moved = [r for r in rows if r["status"] == "moved"]
    assert {r["source_uri"].split("/")[-2] for r in moved} == {"T2"}
    assert {r["reason"] for r in rows if r["status"] == "skipped"} == {"not_selected"}
    assert {(r["operation"], r["level"], r["key_id"]) for r in rows} == {("split", "Study", moved[0]["key_id"])}
    assert rows[0]["request"] == "split: 26 instance(s) in 1 series; Replace PatientName; Remove ReferringPhysicianName; KeepSource false"
    study_uid = {r["study_instance_uid"] for r in moved}
    assert len(study_uid) == 1 and len({r["series_instance_uid"] for r in moved}) == 1
    files = sorted(out.rglob("*.dcm"))
    assert sorted(r["output_uri"] for r in moved) == [str(p) for p in files]
    for row in moved:
        path = Path(row["output_uri"])
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["output_sha256"]
        ds = pydicom.dcmread(path)
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (
            row["study_instance_uid"], row["series_instance_uid"], row["sop_instance_uid"])  # fmt: skip
        assert ds.PatientName == "Hello" and "ReferringPhysicianName" not in ds
        assert path.relative_to(out).parts == (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID + ".dcm")
    summary = json.loads((audit / "summary.json").read_text())
    assert summary["Description"] == "dicom-deid split"
    assert summary["InstancesCount"] == 26 and summary["FailedInstancesCount"] == 0
    assert summary["TargetStudyUID"] == study_uid.pop()
    assert summary["Statuses"] == {"written": 0, "failed": 0, "skipped": 24, "moved": 26, "copied": 0}
    assert [r["Type"] for r in summary["Resources"]] == ["Instance"] * 26 + ["Series", "Study", "Patient"]
    assert summary["Resources"][-2]["ID"] == summary["TargetStudy"]
    crosswalk = pq.read_table(next((tmp_path / "cw").glob("*.parquet")))
    assert crosswalk.schema.equals(CROSSWALK_SCHEMA) and crosswalk.num_rows == 26
    assert set(crosswalk.column("original_study_instance_uid").to_pylist()) == {"2.16.840.1.113669.632.20.121711.10000160881"}
    assert not (out / psm.TMP_DIR_NAME).exists()
    # A rerun with the same key into a fresh folder gives the same files, byte for byte.
    again = tmp_path / "again"
    assert run([*argv[:2], str(again), *argv[3:-4], "--audit", str(tmp_path / "audit2")]) == 0
    assert [p.relative_to(again) for p in sorted(again.rglob("*.dcm"))] == [p.relative_to(out) for p in files]
    assert all((again / p.relative_to(out)).read_bytes() == p.read_bytes() for p in files)


def test_keep_source_and_copy_unselected(samples: Path, tmp_path: Path, key_file: Path) -> None:
    out, audit = tmp_path / "out", tmp_path / "audit"
    body = json.dumps({"Instances": ["1.3.46.670589.11.17521.5.0.3124.2008081908590448738"], "KeepSource": True})
    assert run(["split", str(samples / "Knee"), str(out), "--study", KNEE_STUDY_ID, "--body", body,
                "--key-file", str(key_file), "--audit", str(audit), "--copy-unselected"]) == 0  # fmt: skip
    rows = audit_rows(audit)
    assert statuses(rows) == {"moved": 1, "copied": 49}
    moved = next(r for r in rows if r["status"] == "moved")
    assert moved["detail"] == "KeepSource: the original was also written unchanged under its own UIDs"
    assert moved["source_uri"].endswith("Knee/T1/IM-0001-0001.dcm")
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 51  # 1 new instance + every original (49 copied + 1 kept source)
    for row in rows:
        if row["status"] == "copied":
            assert Path(row["output_uri"]).read_bytes() == Path(row["source_uri"]).read_bytes()
            assert row["study_instance_uid"] == "2.16.840.1.113669.632.20.121711.10000160881"
    original = pydicom.dcmread(moved["source_uri"])
    kept = out / original.StudyInstanceUID / original.SeriesInstanceUID / f"{original.SOPInstanceUID}.dcm"
    assert kept.read_bytes() == Path(moved["source_uri"]).read_bytes()
    new = pydicom.dcmread(moved["output_uri"])
    assert new.InstanceNumber == 1 and new.StudyInstanceUID != original.StudyInstanceUID
    summary = json.loads((audit / "summary.json").read_text())
    assert (summary["KeepSource"], summary["CopyUnselected"], summary["InstancesCount"]) == (True, True, 1)


def test_bad_files_get_failure_rows(samples: Path, tmp_path: Path, key_file: Path) -> None:
    src = tmp_path / "in"
    shutil.copytree(samples / "Knee" / "T2", src / "T2")
    (src / "notes.txt").write_text("not a DICOM file")
    whole = (samples / "Knee" / "T2" / "IM-0001-0001.dcm").read_bytes()
    (src / "truncated.dcm").write_bytes(whole[: len(whole) // 2])
    (src / "empty.dcm").write_bytes(b"")
    out, audit = tmp_path / "out", tmp_path / "audit"
    code = run(["split", str(src), str(out), "--study", "2.16.840.1.113669.632.20.121711.10000160881",
                "--body", json.dumps({"Series": [KNEE_T2_UID]}), "--key-file", str(key_file), "--audit", str(audit)])  # fmt: skip
    assert code == cli.EXIT_SOME_FAILED
    rows = audit_rows(audit)
    assert statuses(rows) == {"moved": 26, "failed": 3}
    failed = {Path(r["source_uri"]).name: (r["reason"], r["output_uri"], r["study_instance_uid"]) for r in rows if r["status"] == "failed"}
    with pytest.raises(InputError) as truncated:  # the reader's own classification of that file
        read_dataset((src / "truncated.dcm").read_bytes())
    assert failed == {
        "notes.txt": ("not_dicom", None, None),
        "truncated.dcm": (truncated.value.reason, None, None),
        "empty.dcm": ("empty", None, None),
    }
    assert len(list(out.rglob("*.dcm"))) == 26


@pytest.mark.parametrize(
    ("body", "study", "message"),
    [
        ({"Series": [KNEE_T2_UID]}, "1.2.3", "split: --study: no instance of this study in INPUT (cannot split an unknown study)"),
        ({"Series": ["1.2.3"]}, KNEE_STUDY_ID, "split: Series[0]: this series does not belong to the study to be split "
                                                "(give a SeriesInstanceUID or an Orthanc series id of that study)"),
        ({"Series": []}, KNEE_STUDY_ID, 'split: both the "Series" and the "Instances" fields are missing or empty: nothing to split'),
        ({"Series": [KNEE_T2_UID], "Replace": {"Modality": "CT"}}, KNEE_STUDY_ID,
         "split: Replace: cannot modify tag 'Modality' (0008,0060) while splitting a study (not in the patient/study modules)"),
    ],
)
def test_refusals_write_nothing(
    samples: Path, tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str], body: dict, study: str, message: str
) -> None:
    out, audit = tmp_path / "out", tmp_path / "audit"
    code = run(["split", str(samples / "Knee"), str(out), "--study", study, "--body", json.dumps(body),
                "--key-file", str(key_file), "--audit", str(audit)])  # fmt: skip
    assert code == cli.EXIT_USAGE
    assert capsys.readouterr().err == f"dicom-deid: {message}\n"
    assert not out.exists() and not audit.exists()


def test_command_line_refusals(samples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["split", str(samples / "Knee"), str(tmp_path / "o"), "--study", KNEE_STUDY_ID]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.endswith("split: give the request body with --body JSON or --config FILE\n")
    assert run(["split", str(samples / "Knee"), str(tmp_path / "o.dcm"), "--study", "1.2", "--body", '{"Series":["1"]}']) == 2
    assert capsys.readouterr().err.endswith("split: OUTPUT must be a folder or gs:// prefix, not a .dcm file\n")
    assert run(["merge", str(samples / "Knee"), str(tmp_path / "o"), "--body", '{"Resources":["1"]}']) == 2
    assert "the following arguments are required: --study" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_split_generated_rtstruct_with_its_ct(tmp_path: Path, key_file: Path) -> None:
    write_reference_studies(tmp_path / "in")
    out, audit = tmp_path / "out", tmp_path / "audit"
    assert run(["split", str(tmp_path / "in"), str(out), "--study", STUDY_A, "--body",
                json.dumps({"Series": [CT_SERIES, RT_SERIES]}), "--key-file", str(key_file), "--audit", str(audit)]) == 0  # fmt: skip
    rows = audit_rows(audit)
    assert statuses(rows) == {"moved": 4, "skipped": 5}
    moved = {Path(r["source_uri"]).name: pydicom.dcmread(r["output_uri"]) for r in rows if r["status"] == "moved"}
    rt = moved["rtstruct.dcm"]
    items = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert items.ReferencedSOPInstanceUID == rt.StudyInstanceUID
    series = items.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == moved["ct1.dcm"].SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == [
        moved[f"ct{i}.dcm"].SOPInstanceUID for i in (1, 2, 3)]  # fmt: skip


def test_index_pass_keeps_only_what_the_planner_needs(tmp_path: Path, samples: Path) -> None:
    paths = write_reference_studies(tmp_path)
    knee = sorted((samples / "Knee" / "T1").glob("*.dcm"))[:2]
    files = [(str(p), p.stat().st_size) for p in [*paths.values(), *knee]]
    mr1 = str(paths["A/mr1.dcm"])
    merge = smf.IndexSelector.for_merge(sm.parse_merge(STUDY_B, {"Resources": [sm.index_entry(mr1, pydicom.dcmread(mr1)).instance]}))
    split = smf.IndexSelector.for_split(sm.parse_split(STUDY_B, {"Series": ["1.2"]}))
    with test_pipeline.TestPipeline() as p:
        created = p | beam.Create(files)
        merged = created | "Merge" >> psm.BuildStudyIndex(merge, 1 << 30) | "M" >> beam.Map(lambda e: (e.study_uid, e.study_tags is not None))
        split_ = created | "Split" >> psm.BuildStudyIndex(split, 1 << 30) | "S" >> beam.Map(lambda e: Path(e.source).name)
        # Merge: the target study (with its tags) and all of study A, whose MR image was named.
        assert_that(merged, equal_to([(STUDY_A, False)] * 7 + [(STUDY_B, True)] * 2), label="merge")
        assert_that(split_, equal_to(["ct1.dcm", "ct2.dcm"]), label="split")


def test_index_entries_round_trip_as_json(tmp_path: Path) -> None:
    paths = write_reference_studies(tmp_path)
    entry = sm.index_entry(str(paths["B/ct1.dcm"]), pydicom.dcmread(paths["B/ct1.dcm"]), study_tags_for=STUDY_B)
    assert smf.decode_entry(smf.encode_entry(entry)) == entry
    plain = entry._replace(study_tags=None)
    assert smf.decode_entry(smf.encode_entry(plain)) == plain


# --------------------------------------------------------------------------- progress


PROGRESS_LINE = re.compile(
    r"\r(\d+) files: (\d+) written, (\d+) failed, (\d+) skipped(?:, (\d+) copied)?(?:, (\d+) moved)?, \d+ files/s   "
)


@pytest.mark.parametrize(("copy_unselected", "expected"), [
    (False, {"moved": 4, "skipped": 5, "failed": 1}),
    (True, {"moved": 4, "copied": 5, "failed": 1}),
])  # fmt: skip
def test_progress_line_counts_every_input(
    tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    copy_unselected: bool, expected: dict[str, int],
) -> None:  # fmt: skip
    write_reference_studies(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not a DICOM file")
    seen: list[tuple[str, list[str]]] = []

    class Recording(pipeline_run.ProgressPrinter):
        def __exit__(self, *exc: object) -> None:
            seen.append((self._folder, sorted(os.listdir(self._folder))))
            super().__exit__(*exc)

    monkeypatch.setattr(pipeline_run, "ProgressPrinter", Recording)
    out, audit = tmp_path / "out", tmp_path / "audit"
    argv = ["split", str(tmp_path / "in"), str(out), "--study", STUDY_A, "--body", json.dumps({"Series": [CT_SERIES, RT_SERIES]}),
            "--key-file", str(key_file), "--audit", str(audit), "--progress"]  # fmt: skip
    assert run([*argv, "--copy-unselected"] if copy_unselected else argv) == cli.EXIT_SOME_FAILED
    err = capsys.readouterr().err
    rows = audit_rows(audit)
    counts = statuses(rows)
    assert counts == expected
    # ProgressPrinter prints once more when the pass ends, then a newline; the failure note follows.
    lines = PROGRESS_LINE.findall(err)
    assert lines and err.endswith(f"\n{cli.PROG}: 1 of 10 input files failed (not_dicom 1); see {audit}\n")
    total, written, failed, skipped, copied, moved = (int(x or 0) for x in lines[-1])
    assert (total, written, failed, skipped, copied, moved) == (
        len(rows), 0, counts.get("failed", 0), counts.get("skipped", 0), counts.get("copied", 0), counts["moved"])  # fmt: skip
    assert err.split("\r")[-1].split("\n")[0].startswith(
        "10 files: 0 written, 1 failed, " + ("0 skipped, 5 copied, 4 moved" if copy_unselected else "5 skipped, 4 moved"))
    # the workers' counters were in the folder when the pass ended; the folder is gone now
    ((folder, names),) = seen
    assert Path(folder).name.startswith("dicom-deid-progress-") and names and all(n.endswith(".json") for n in names)
    assert not os.path.exists(folder)


def test_progress_default_follows_the_terminal(
    tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_reference_studies(tmp_path / "in")

    def split(out: str, *extra: str) -> int:
        return run(["split", str(tmp_path / "in"), str(tmp_path / out), "--study", STUDY_A,
                    "--body", json.dumps({"Series": [CT_SERIES]}), "--key-file", str(key_file), *extra])  # fmt: skip

    assert split("not-a-tty") == 0
    assert capsys.readouterr().err == ""  # stderr is captured, not a terminal: no progress line
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert split("tty") == 0
    assert [tuple(int(x or 0) for x in m) for m in PROGRESS_LINE.findall(capsys.readouterr().err)][-1] == (
        9, 0, 0, 6, 0, 3)  # fmt: skip
    assert split("tty-no-progress", "--no-progress") == 0
    assert capsys.readouterr().err == ""


def test_apply_pass_holds_each_file_in_the_process_memory_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Pass 2 counts a file's bytes in the shared budget while it is read and rewritten (a file
    over --max-bytes is refused unread and holds nothing)."""
    from transforms.beam import process_budget

    budget = process_budget(1_000_000)
    seen: list[tuple[str, int]] = []

    def process_instance(path, size, plan, cfg):
        seen.append((path, budget.used))
        return {"status": "skipped"}, None

    monkeypatch.setattr(smf, "load_plan", lambda uri: "the plan")
    monkeypatch.setattr(smf, "process_instance", process_instance)
    cfg = smf.ApplyConfig(plan_uri="unused", output_root=str(tmp_path), run_id="r", key_id="k", max_bytes=500_000,
                          memory_budget=1_000_000)  # fmt: skip
    fn = psm._ApplyFn(cfg)
    fn.setup()
    for path, size in (("a", 400_000), ("b", 600_000), ("c", 0)):
        assert list(fn.process((path, size))) == [{"status": "skipped"}]
    assert seen == [("a", 400_000), ("b", 0), ("c", 0)]
    assert budget.used == 0


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_during_a_split_cleans_its_index_out_of_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str], signame: str):
    """The index of pass 1 holds original identifiers; SIGTERM (timeout, schedulers) or SIGHUP
    (a closed terminal) in pass 2 unwinds like Ctrl-C: exit 130 and no temporary folder left in
    OUTPUT."""
    import os
    import signal

    signum = getattr(signal, signame)
    monkeypatch.setattr(signal, "getsignal", lambda s, real=signal.getsignal: signal.SIG_DFL if s == signal.SIGHUP
                        else real(s))  # (pytest may run under nohup)

    real = pipeline_run.run_and_wait
    calls = []

    def second_pass_terminated(pipeline, options, *progress):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)
        return real(pipeline, options, *progress)

    monkeypatch.setattr(pipeline_run, "run_and_wait", second_pass_terminated)
    folder = tmp_path / "in"
    datasets = make_study(seed=12, n_ct=2, rtstruct=False, sr=False)
    write_study(datasets, folder)
    key = tmp_path / "k.key"
    key.write_bytes(b"split-sigterm-key-0123456789")
    args = ["split", str(folder), str(tmp_path / "out"), "--study", str(datasets[0].StudyInstanceUID),
            "--body", json.dumps({"Series": [str(datasets[0].SeriesInstanceUID)]}), "--key-file", str(key), "--quiet"]
    assert cli.main(args) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip().splitlines()[-1] == "dicom-deid: interrupted"
    assert len(calls) == 2
    assert not (tmp_path / "out" / ".dicom-deid-tmp").exists() or not any((tmp_path / "out" / ".dicom-deid-tmp").rglob("*"))


def test_big_endian_references_with_uids_whose_length_looks_like_a_digit(tmp_path: Path):
    """In explicit VR big endian the byte before a UID of 48-57 characters (its length's low
    byte) is an ASCII digit: the read-only reference scan must still see the UID, so the moved
    RTSTRUCT follows its moved CT images (it used to keep the old UIDs)."""
    from pydicom.uid import ExplicitVRBigEndian

    from tests.test_split_synthetic import CT_SOPS, make_reference_studies, referenced_uids

    root, long_root = "1.2.826.0.1.3680043.10.1234", "1.2.826.0.1.3680043.10.1234.999999999999999999"

    def lengthen(ds):
        for elem in ds:
            if elem.VR == "UI" and isinstance(elem.value, str) and elem.value.startswith(root):
                elem.value = elem.value.replace(root, long_root)
            elif elem.VR == "SQ":
                for item in elem.value:
                    lengthen(item)

    folder = tmp_path / "in"
    for name, ds in make_reference_studies().items():
        if not name.startswith("A/"):
            continue
        lengthen(ds)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / name, enforce_file_format=True, little_endian=False, implicit_vr=False)
    refs_in = [v for k, v in referenced_uids(pydicom.dcmread(folder / "A/rtstruct.dcm")) if k == "ReferencedSOPInstanceUID"]
    assert {len(v) for v in refs_in} & set(range(48, 58))  # the case at hand
    key = tmp_path / "k.key"
    key.write_bytes(KEY_BYTES)
    body = {"Series": [s.replace(root, long_root) for s in (CT_SERIES, RT_SERIES)]}
    assert cli.main(["split", str(folder), str(tmp_path / "out"), "--study", STUDY_A.replace(root, long_root),
                     "--body", json.dumps(body), "--key-file", str(key), "--quiet"]) == 0
    rows = {Path(r["source_uri"]).relative_to(folder).as_posix(): r for r in pq.read_table(
        next((tmp_path / "out-audit").glob("audit-*.parquet"))).to_pylist()}
    new_ct = {pydicom.dcmread(rows[f"A/ct{i}.dcm"]["output_uri"]).SOPInstanceUID for i in (1, 2, 3)}
    refs = [v for k, v in referenced_uids(pydicom.dcmread(rows["A/rtstruct.dcm"]["output_uri"]))
            if k == "ReferencedSOPInstanceUID"]
    old_ct = {s.replace(root, long_root) for s in CT_SOPS}
    assert sum(r in new_ct for r in refs) == 4 and not old_ct & set(refs)


def test_a_refused_split_leaves_no_folder_it_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    folder = tmp_path / "in"
    datasets = make_study(seed=13, n_ct=1, rtstruct=False, sr=False)
    write_study(datasets, folder)
    key = tmp_path / "k.key"
    key.write_bytes(KEY_BYTES)
    code = cli.main(["split", str(folder), str(tmp_path / "a" / "b" / "out"), "--study", "1.2.3",
                     "--body", json.dumps({"Series": ["1.2"]}), "--key-file", str(key), "--quiet"])
    assert code == cli.EXIT_USAGE
    assert "no instance of this study in INPUT" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "k.key"]


def test_a_selection_lost_to_max_bytes_is_blamed_on_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Files over --max-bytes are not read by the index pass: a series all of whose files are
    that large is "not in the study", which the refusal now says may be --max-bytes's doing."""
    folder = tmp_path / "in"
    datasets = make_study(seed=13, n_ct=2, rtstruct=True, sr=False)
    paths = write_study(datasets, folder)
    rt = [(p, ds) for p, ds in zip(paths, datasets) if ds.Modality == "RTSTRUCT"]
    ct = [p for p, ds in zip(paths, datasets) if ds.Modality == "CT"]
    limit = min(p.stat().st_size for p, _ in rt) - 1
    assert len(rt) == 1 and len(ct) == 2 and max(p.stat().st_size for p in ct) <= limit  # the CTs are read
    key = tmp_path / "k.key"
    key.write_bytes(KEY_BYTES)
    study, series = rt[0][1].StudyInstanceUID, rt[0][1].SeriesInstanceUID
    code = cli.main(["split", str(folder), str(tmp_path / "out"), "--study", study, "--max-bytes", str(limit),
                     "--body", json.dumps({"Series": [series]}), "--key-file", str(key), "--quiet"])
    assert code == cli.EXIT_USAGE
    assert capsys.readouterr().err == (
        "dicom-deid: split: Series[0]: this series does not belong to the study to be split (give a "
        "SeriesInstanceUID or an Orthanc series id of that study); 1 input file over --max-bytes "
        f"({limit:,} bytes) was not read: raise --max-bytes if what you selected is among them\n")
    assert not (tmp_path / "out").exists()
    # a refusal the limit cannot explain gets no such hint (a patient's id where a merge wants
    # a study, series or instance)
    from transforms.orthanc_ids import orthanc_ids

    patient = orthanc_ids(rt[0][1].PatientID, study, series, rt[0][1].SOPInstanceUID)["patient"]
    code = cli.main(["merge", str(folder), str(tmp_path / "out"), "--study", study, "--max-bytes", str(limit),
                     "--body", json.dumps({"Resources": [patient]}), "--key-file", str(key), "--quiet"])
    assert code == cli.EXIT_USAGE
    assert capsys.readouterr().err == (
        "dicom-deid: merge: Resources[0]: this is a patient, neither a study, nor a series, nor an instance\n")
    # without the limit, the same selection splits
    assert cli.main(["split", str(folder), str(tmp_path / "out"), "--study", study,
                     "--body", json.dumps({"Series": [series]}), "--key-file", str(key), "--quiet"]) == 0


def test_one_sop_uid_filed_in_two_series_is_two_instances(tmp_path: Path):
    """Orthanc's instance ids hash PatientID, Study, Series and SOP Instance UIDs: the same
    SOPInstanceUID in two series is two instances, each moved into its own new series (the
    second used to fail as duplicate_instance and the first to land in the wrong series)."""
    folder = tmp_path / "in"
    datasets = make_study(seed=14, n_ct=2, rtstruct=False, sr=False)
    write_study(datasets, folder)
    copy = pydicom.dcmread(next(folder.glob("000_*.dcm")))
    copy.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.14.9"
    copy.SeriesDescription = "copy filed in another series"
    copy.save_as(folder / "copy.dcm")
    key = tmp_path / "k.key"
    key.write_bytes(KEY_BYTES)
    body = {"Series": [str(datasets[0].SeriesInstanceUID), str(copy.SeriesInstanceUID)]}
    assert cli.main(["split", str(folder), str(tmp_path / "out"), "--study", str(datasets[0].StudyInstanceUID),
                     "--body", json.dumps(body), "--key-file", str(key), "--quiet"]) == 0
    rows = pq.read_table(next((tmp_path / "out-audit").glob("audit-*.parquet"))).to_pylist()
    assert [r["status"] for r in rows] == ["moved"] * 3
    outputs = [pydicom.dcmread(r["output_uri"]) for r in rows]
    assert len({d.SOPInstanceUID for d in outputs}) == 3
    by_description = {d.SeriesDescription: d.SeriesInstanceUID for d in outputs}
    assert len(set(by_description.values())) == 2


def test_a_duplicate_instance_row_names_the_identity_it_collided_on(tmp_path: Path):
    folder = tmp_path / "in"
    datasets = make_study(seed=15, n_ct=1, rtstruct=False, sr=False)
    write_study(datasets, folder)
    other = pydicom.dcmread(next(folder.glob("000_*.dcm")))
    other.ImageComments = "same instance, other content"
    other.save_as(folder / "zz-other.dcm")
    key = tmp_path / "k.key"
    key.write_bytes(KEY_BYTES)
    body = {"Series": [str(datasets[0].SeriesInstanceUID)]}
    assert cli.main(["split", str(folder), str(tmp_path / "out"), "--study", str(datasets[0].StudyInstanceUID),
                     "--body", json.dumps(body), "--key-file", str(key), "--quiet"]) == cli.EXIT_SOME_FAILED
    rows = {Path(r["source_uri"]).name: r for r in pq.read_table(next((tmp_path / "out-audit").glob("audit-*.parquet"))).to_pylist()}
    moved, duplicate = rows["000_CT.dcm"], rows["zz-other.dcm"]
    assert (moved["status"], duplicate["status"], duplicate["reason"]) == ("moved", "failed", "duplicate_instance")
    for column in ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "instance_orthanc_id"):
        assert duplicate[column] == moved[column] is not None
    assert duplicate["output_uri"] is None


@pytest.mark.parametrize("loser_first", [True, False])
def test_which_duplicate_moves_is_the_plans_choice_not_the_workers_order(tmp_path: Path, loser_first: bool):
    """Two inputs with one instance's identifiers and different content: the plan's first (by
    URI) is moved, the other fails as a duplicate, whichever a worker reaches first (it used to
    be whichever was published first: reruns with several workers moved either file)."""
    from transforms.identity import Key

    folder = tmp_path / "in"
    datasets = make_study(seed=16, n_ct=1, rtstruct=False, sr=False)
    write_study(datasets, folder)
    winner = next(folder.glob("000_*.dcm"))
    other = pydicom.dcmread(winner)
    other.ImageComments = "same instance, other content"
    loser = folder / "zz-other.dcm"
    other.save_as(loser)
    same = folder / "zz-same.dcm"
    shutil.copyfile(winner, same)  # an identical copy: moved too, to the same bytes
    key = Key.from_bytes(KEY_BYTES)
    index = [sm.index_entry(str(p), pydicom.dcmread(p, stop_before_pixels=True)) for p in sorted(folder.glob("*.dcm"))]
    plan = sm.plan_split(index, sm.parse_split(str(datasets[0].StudyInstanceUID),
                                               {"Series": [str(datasets[0].SeriesInstanceUID)]}), key)
    assert plan.duplicate_of == {str(loser): str(winner), str(same): str(winner)}
    cfg = smf.ApplyConfig(plan_uri="unused", output_root=str(tmp_path / "out"), run_id="run-1", key_id=key.key_id)
    order = [loser, same, winner] if loser_first else [winner, same, loser]
    rows = {}
    for path in order:
        row, _ = smf.process_instance(str(path), path.stat().st_size, plan, cfg)
        rows[path.name] = row
    assert (rows[winner.name]["status"], rows[same.name]["status"]) == ("moved", "moved")
    assert rows[same.name]["output_sha256"] == rows[winner.name]["output_sha256"]
    assert (rows[loser.name]["status"], rows[loser.name]["reason"], rows[loser.name]["output_uri"]) == \
        ("failed", "duplicate_instance", None)
    written = pydicom.dcmread(rows[winner.name]["output_uri"])
    assert "ImageComments" not in written or written.ImageComments != "same instance, other content"


def _plan_for(folder: Path, datasets: list, keep_source: bool = False,
              replace: dict | None = None) -> tuple[sm.Plan, "Key"]:
    key = Key.from_bytes(KEY_BYTES)
    index = [sm.index_entry(str(p), pydicom.dcmread(p, stop_before_pixels=True)) for p in sorted(folder.glob("*.dcm"))]
    body = {"Series": [str(datasets[0].SeriesInstanceUID)], "KeepSource": keep_source, "Replace": replace or {}}
    return sm.plan_split(index, sm.parse_split(str(datasets[0].StudyInstanceUID), body), key), key


def _one_ct_without_pixels(tmp_path: Path, seed: int) -> tuple[Path, list, Path, pydicom.Dataset]:
    """A one-CT study in ``tmp_path/in``: (folder, datasets, the CT's path, its data set read
    back without PixelData, for a test to append damaged elements to)."""
    folder = tmp_path / "in"
    datasets = make_study(seed=seed, n_ct=1, rtstruct=False, sr=False)
    write_study(datasets, folder)
    path = next(folder.glob("000_*.dcm"))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    return folder, datasets, path, ds


@pytest.mark.parametrize("cut_first", [True, False])
def test_a_copy_cut_short_does_not_take_the_good_copy_down(tmp_path: Path, cut_first: bool):
    """The plan reads headers only, so a copy of an instance cut inside its pixel data can be
    the duplicates' defining input (the first by URI). It fails as truncated; the good copy
    used to fail as its duplicate, and the instance was in neither OUTPUT nor any moved row."""
    folder = tmp_path / "in"
    datasets = make_study(seed=17, n_ct=1, rtstruct=False, sr=False)
    write_study(datasets, folder)
    good = next(folder.glob("000_*.dcm"))
    cut = folder / "0.dcm"  # sorts before 000_CT.dcm: the defining input
    cut.write_bytes(good.read_bytes()[:-4])
    plan, key = _plan_for(folder, datasets)
    assert plan.duplicate_of == {str(good): str(cut)}
    cfg = smf.ApplyConfig(plan_uri="unused", output_root=str(tmp_path / "out"), run_id="run-1", key_id=key.key_id)
    rows = {}
    for path in ([cut, good] if cut_first else [good, cut]):
        rows[path.name] = smf.process_instance(str(path), path.stat().st_size, plan, cfg)[0]
    assert (rows[cut.name]["status"], rows[cut.name]["reason"]) == ("failed", "truncated")
    assert (rows[good.name]["status"], rows[good.name]["reason"]) == ("moved", None)
    written = pydicom.dcmread(rows[good.name]["output_uri"])
    assert written.SOPInstanceUID == plan.moves[str(cut)][1] and written.PixelData == datasets[0].PixelData
    assert [p.name for p in (tmp_path / "out").rglob("*.dcm")] == [Path(rows[good.name]["output_uri"]).name]


def test_a_damaged_sequence_the_plan_rewrites_is_the_file_s_invalid_value(tmp_path: Path):
    """A (7FE0,0010) of VR SQ and undefined length inside the evidence sequence a split
    rewrites (a damaged file: a tag byte changed): pydicom's writer raised AttributeError while
    re-encoding the sequence, and the row said internal_error (found by tests.mutation_run,
    seed 78)."""
    import struct

    from tests.pipeline_support import explicit_element as element
    from tests.pipeline_support import explicit_item as item
    from transforms.dicomio import write_dataset

    folder, datasets, path, ds = _one_ct_without_pixels(tmp_path, seed=19)
    damaged = (struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"SQ", 0, 0xFFFFFFFF)
               + item(element(0x0008, 0x1155, b"UI", b"1.2.3.4.5")) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    series = element(0x0008, 0x1115, b"SQ", item(element(0x0020, 0x000E, b"UI", str(ds.SeriesInstanceUID).encode())
                                                  + damaged))
    evidence = element(0x0040, 0xA375, b"SQ", item(series + element(0x0020, 0x000D, b"UI",
                                                                    str(ds.StudyInstanceUID).encode())))
    path.write_bytes(write_dataset(ds) + evidence)
    plan, key = _plan_for(folder, datasets)
    cfg = smf.ApplyConfig(plan_uri="unused", output_root=str(tmp_path / "out"), run_id="run-1", key_id=key.key_id)
    row, crosswalk = smf.process_instance(str(path), path.stat().st_size, plan, cfg)
    assert (row["status"], row["reason"], row["detail"], crosswalk) == (
        "failed", "invalid_value", "encode: element (0040,A375) cannot be encoded: its value does not fit its VR", None)
    assert not (tmp_path / "out").exists()


def test_pixel_data_under_a_text_vr_is_the_file_s_invalid_value_in_the_switch_to_utf8(tmp_path: Path):
    """An encapsulated (7FE0,0010) whose VR was damaged into UC (undefined length) was read as a
    view of the file, and the switch to UTF-8 (a Replace value the file's character set cannot
    hold) decodes every text element: pydicom's decoder raised AttributeError on the view, an
    internal_error (found by tests.mutation_run, seed 79). Read as the text its VR says, it
    cannot be written back as UC of undefined length: invalid_value; without the switch, the
    element is copied as read."""
    import struct

    from tests.pipeline_support import explicit_item as item
    from transforms.dicomio import write_dataset

    folder, datasets, path, ds = _one_ct_without_pixels(tmp_path, seed=20)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"  # JPEG baseline: encapsulated pixel data
    pixels = (struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"UC", 0, 0xFFFFFFFF) + item(b"") + item(b"\x00\x01" * 40000)
              + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    path.write_bytes(write_dataset(ds) + pixels)
    plan, key = _plan_for(folder, datasets, replace={"StudyDescription": "\u5317\u4eac"})  # not Latin-1
    cfg = smf.ApplyConfig(plan_uri="unused", output_root=str(tmp_path / "out"), run_id="run-1", key_id=key.key_id)
    row, _ = smf.process_instance(str(path), path.stat().st_size, plan, cfg)
    assert (row["status"], row["reason"], row["detail"]) == (
        "failed", "invalid_value", "encode: element (7FE0,0010) cannot be encoded: its value does not fit its VR")
    assert not (tmp_path / "out").exists()
    ds.StudyDescription = "Kopf"  # the same file, without the switch: copied as read
    path.write_bytes(write_dataset(ds) + pixels)
    plan, _ = _plan_for(folder, datasets, replace={"StudyDescription": "Kopf"})
    row, _ = smf.process_instance(str(path), path.stat().st_size, plan, cfg)
    assert (row["status"], row["reason"]) == ("moved", None)
    assert Path(row["output_uri"]).read_bytes().endswith(pixels)


def test_keep_source_that_cannot_keep_the_original_writes_nothing(tmp_path: Path):
    """KeepSource writes the original under its own UIDs. Where another file with other content
    already lies there (two inputs sharing Study/Series/SOP UIDs under two PatientIDs, as in the
    shared samples, one of them copied by --copy-unselected), the row fails and nothing of the
    input is written; the re-parented file used to be written, its row failed, output_uri null."""
    folder = tmp_path / "in"
    datasets = make_study(seed=18, n_ct=1, rtstruct=False, sr=False)
    write_study(datasets, folder)
    source = next(folder.glob("000_*.dcm"))
    plan, key = _plan_for(folder, datasets, keep_source=True)
    out = tmp_path / "out"
    cfg = smf.ApplyConfig(plan_uri="unused", output_root=str(out), run_id="run-1", key_id=key.key_id)
    ds = datasets[0]
    original = out / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    original.parent.mkdir(parents=True)
    original.write_bytes(b"another file under the same UIDs")
    row, crosswalk = smf.process_instance(str(source), source.stat().st_size, plan, cfg)
    assert (row["status"], row["reason"], row["output_uri"], crosswalk) == ("failed", "duplicate_instance", None, None)
    assert row["detail"].startswith("KeepSource: another file with different content already lies under this")
    assert row["sop_instance_uid"] is None  # the original's UIDs are never in the audit
    assert [p for p in out.rglob("*") if p.is_file()] == [original]
    original.unlink()
    row, _ = smf.process_instance(str(source), source.stat().st_size, plan, cfg)
    assert (row["status"], row["detail"]) == ("moved", "KeepSource: the original was also written unchanged under its own UIDs")
    assert original.read_bytes() == source.read_bytes() and Path(row["output_uri"]).is_file()


def test_a_temporary_directory_named_like_a_pattern_is_refused_up_front(tmp_path: Path, monkeypatch, capsys):
    """The study index goes to the system's temporary directory through Beam's text sink,
    which reads ``[1]`` as a pattern: the run used to end in an internal error (BeamIOError)."""
    import tempfile

    folder = tmp_path / "in"
    datasets = make_study(seed=19, n_ct=1, rtstruct=False, sr=False)
    write_study(datasets, folder)
    odd = tmp_path / "tmp[1]"
    odd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(odd))
    key = tmp_path / "k.key"
    key.write_bytes(KEY_BYTES)
    code = cli.main(["split", str(folder), str(tmp_path / "out"), "--study", str(datasets[0].StudyInstanceUID),
                     "--body", json.dumps({"Series": [str(datasets[0].SeriesInstanceUID)]}), "--key-file", str(key)])
    assert code == cli.EXIT_USAGE
    assert capsys.readouterr().err == (f"dicom-deid: split: the temporary directory {str(odd)!r} holds *, ? or [, which "
                                       "Beam's file sinks read as patterns: set TMPDIR to another folder\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "k.key", "tmp[1]"] and not any(odd.iterdir())


def test_the_study_index_never_sits_under_output_when_avoidable(tmp_path: Path):
    """The index and the plan hold original identifiers: a run killed with kill -9 used to leave
    them in OUTPUT/.dicom-deid-tmp/ (the folder that gets shared), also on gs://."""
    import tempfile

    local = pipeline_run.pipeline_options([])
    folder = psm.work_folder(local, "gs://shared-out/deid", "run-7")
    try:
        assert os.path.dirname(folder) == tempfile.gettempdir() and os.path.basename(folder).startswith("dicom-deid-run-7-")
    finally:
        psm.remove_work_folder(folder, "gs://shared-out/deid", "run-7")
    assert not os.path.exists(folder)
    remote = pipeline_run.pipeline_options(["--runner", "DataflowRunner", "--temp_location", "gs://scratch/tmp"])
    assert psm.work_folder(remote, "gs://shared-out/deid", "run-7") == "gs://scratch/tmp/dicom-deid-run-7"
    bare = pipeline_run.pipeline_options(["--runner", "DataflowRunner"])
    assert psm.work_folder(bare, "gs://shared-out/deid", "run-7") == "gs://shared-out/deid/.dicom-deid-tmp/run-7"


class _RemoteHandle(io.BytesIO):
    """A remote object's handle that records what was fetched: like Beam's GCS reader, a seek
    before what it last fetched would fetch again, so it is refused here."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.fetched = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.fetched += len(chunk)
        return chunk

    def seek(self, pos: int, whence: int = 0) -> int:
        raise AssertionError("a seek on the remote handle fetches the object again")


@pytest.mark.parametrize(("head_bytes", "fetched"), [(16 << 20, 3384), (1000, 3384), (3000, 3000)])
def test_a_remote_header_is_read_in_one_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, head_bytes: int,
                                             fetched: int):
    """Pass 1 on gs://: the header comes from one read of the object's start (the whole
    object when small), never by seeking back (which refetched it: measured twice the bytes);
    a header longer than the first read (1000 bytes into this 3,384-byte CT) reads the rest; one
    that ends inside it (the pixel data starts at 2,860) reads no more."""
    study = make_study(seed=7, n_ct=1)
    write_study(study, tmp_path / "in")
    path = next(p for p in sorted((tmp_path / "in").rglob("*.dcm")) if "CT" in p.name)
    data = path.read_bytes()
    local = smf.read_header(str(path), len(data), 1 << 30)
    handles: list[_RemoteHandle] = []

    class Remote:
        @staticmethod
        def open(uri: str, compression_type: object = None) -> _RemoteHandle:
            assert uri == "gs://bucket/ct.dcm"
            handles.append(_RemoteHandle(data))
            return handles[-1]

    monkeypatch.setattr(files, "FileSystems", Remote)
    monkeypatch.setattr(files, "_REMOTE_HEAD_BYTES", head_bytes)
    ds = smf.read_header("gs://bucket/ct.dcm", len(data), 1 << 30)
    assert ds is not None and ds == local and "PixelData" not in ds and ds.PatientID == "PID-PLANTED-0001"
    assert len(data) == 3384 and data.index(b"\xe0\x7f\x10\x00") == 2860  # PixelData's tag
    assert [h.fetched for h in handles] == [fetched]  # each byte fetched once at most


def test_what_a_split_leaves_alone_is_described_from_its_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]):
    """Pass 2 reads an unselected file whole only to say why it fails: a readable header gives
    its skipped row (splitting one study out of an archive no longer reads every other file
    twice), a truncated image it leaves alone is skipped as well (its pixels are not looked
    at), and a file that is not DICOM still fails with its reason."""
    paths = write_reference_studies(tmp_path / "in")
    truncated = paths["B/ct2.dcm"]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (tmp_path / "in" / "notes.dcm").write_text("not DICOM\n")
    read_whole: list[str] = []
    real = smf.read_input
    monkeypatch.setattr(smf, "read_input", lambda path, *args: read_whole.append(Path(path).name) or real(path, *args))
    (tmp_path / "key").write_bytes(KEY_BYTES)
    code = cli.main(["split", str(tmp_path / "in"), str(tmp_path / "out"), "--study", STUDY_A, "--key-file",
                     str(tmp_path / "key"), "--quiet", "--body", json.dumps({"Series": [CT_SERIES]})])
    assert code == cli.EXIT_SOME_FAILED, capsys.readouterr().err  # notes.dcm
    rows = {Path(r["source_uri"]).relative_to(tmp_path / "in").as_posix(): r
            for r in pq.read_table(tmp_path / "out-audit", ignore_prefixes=["summary", "."]).to_pylist()}
    assert {name: (r["status"], r["reason"]) for name, r in rows.items()} == {
        **{f"A/ct{i}.dcm": ("moved", None) for i in (1, 2, 3)},
        **{name: ("skipped", "not_selected") for name in ("A/rtstruct.dcm", "A/mr1.dcm", "A/mr2.dcm", "A/sr.dcm",
                                                          "B/ct1.dcm", "B/ct2.dcm")},
        "notes.dcm": ("failed", "not_dicom"),
    }
    assert (rows["B/ct2.dcm"]["modality"], rows["B/ct2.dcm"]["transfer_syntax_in"]) == ("CT", "1.2.840.10008.1.2.1")
    assert rows["A/mr1.dcm"]["modality"] == "MR" and rows["A/sr.dcm"]["modality"] == "SR"
    assert sorted(read_whole) == ["ct1.dcm", "ct2.dcm", "ct3.dcm", "notes.dcm"]  # the moved CTs of A


def test_the_readme_listing_snippet_names_the_studies_and_series_to_split(tmp_path: Path):
    """The README's way to find a split's or merge's UIDs, run as written (with archive/ here)."""
    import subprocess

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    [block] = [b.split("```", 1)[0] for b in readme.split("```bash\n")[1:] if "python - archive/ <<'EOF'" in b]
    script = block.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    study = make_study(seed=8, n_ct=2)
    write_study(study, tmp_path / "archive" / "one")
    (tmp_path / "archive" / "notes.txt").write_text("not DICOM\n")
    done = subprocess.run([sys.executable, "-", "archive/"], input=script, capture_output=True, text=True,
                          cwd=tmp_path, timeout=60, check=True)
    from transforms.orthanc_ids import orthanc_ids

    expected = ["orthanc_study\tpatient_id\tstudy_uid\tseries_uid\tmodality\tseries_description\tfiles"] + sorted(
        "\t".join([orthanc_ids(ds.PatientID, ds.StudyInstanceUID, "", "")["study"], str(ds.PatientID),
                   str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), ds.Modality,
                   str(ds.get("SeriesDescription", "")), str(n)])
        for ds, n in {str(d.SeriesInstanceUID): (d, sum(x.SeriesInstanceUID == d.SeriesInstanceUID for x in study))
                      for d in study}.values()
    )
    assert done.stdout.splitlines() == expected and done.stderr == ""


@pytest.mark.parametrize("copy_unselected", [False, True])
def test_an_instance_the_first_pass_missed_fails_instead_of_staying_behind(
        samples: Path, tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch, copy_unselected: bool) -> None:
    """A file of the moved series that the index pass could not read (a transient gs:// error,
    or a file replaced between the passes) used to be "not selected": the series ended up in
    two studies and the run exited 0 (found by a review). It now fails as read_error, exit 3."""
    src = tmp_path / "in"
    shutil.copytree(samples / "Knee", src)
    missed = src / "T2" / "IM-0001-0003.dcm"
    real = smf.index_file
    monkeypatch.setattr(smf, "index_file", lambda path, *a: None if path == str(missed) else real(path, *a))
    out, audit = tmp_path / "out", tmp_path / "audit"
    argv = ["split", str(src), str(out), "--study", KNEE_STUDY_ID, "--body", json.dumps({"Series": [KNEE_T2_UID]}),
            "--key-file", str(key_file), "--audit", str(audit)]
    assert run(argv + (["--copy-unselected"] if copy_unselected else [])) == cli.EXIT_SOME_FAILED
    rows = {Path(r["source_uri"]).relative_to(src).as_posix(): r for r in audit_rows(audit)}
    row = rows.pop("T2/IM-0001-0003.dcm")
    assert (row["status"], row["reason"], row["output_uri"]) == ("failed", "read_error", None)
    assert row["detail"] == ("select: this instance belongs to what the split moves, but the first pass could not index it "
                             "(unreadable then, or changed since): rerun to move it")
    assert {(name.split("/")[0], r["status"]) for name, r in rows.items()} == {
        ("T1", "copied" if copy_unselected else "skipped"), ("T2", "moved")}
    summary = json.loads((audit / "summary.json").read_text())
    assert (summary["InstancesCount"], summary["FailedInstancesCount"]) == (26, 1)  # 25 moved + the failed one


def test_a_release_and_files_with_original_identifiers_never_share_an_output(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Found by a newcomer following the README: a split written into the quick start's
    anonymized OUTPUT put files with original identifiers into the release (the only word was
    the other-key warning). The last run's summary.json (in the default audit folder) says
    which kind OUTPUT holds; the other kinds are refused before anything is written, and the
    same kind runs again."""
    folder = tmp_path / "in"
    write_reference_studies(folder)
    key = tmp_path / "k.key"
    key.write_bytes(KEY_BYTES)
    common = ["--key-file", str(key), "--quiet"]
    out = tmp_path / "out"
    assert cli.main(["anonymize", str(folder), str(out), *common]) == 0
    files_before = sorted(p for p in out.rglob("*") if p.is_file())
    run_id = json.loads((tmp_path / "out-audit" / "summary.json").read_text())["RunId"]
    capsys.readouterr()
    body = json.dumps({"Series": [CT_SERIES]})
    for argv, command in ((["split", str(folder), str(out), "--study", STUDY_A, "--body", body], "split"),
                          (["modify", str(folder), str(out)], "modify")):
        assert cli.main([*argv, *common]) == cli.EXIT_USAGE
        assert capsys.readouterr().err == (
            f"dicom-deid: OUTPUT {str(out)!r} holds {len(files_before)} de-identified files of an anonymize run "
            f"({run_id}): the files of this {command} keep original identifiers and must not sit beside them; give "
            "OUTPUT a folder of its own\n")
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files_before
    assert cli.main(["anonymize", str(folder), str(out), *common]) == 0  # the same kind: a rerun
    # and the reverse: an anonymization into a split's OUTPUT
    split_out = tmp_path / "split"
    assert cli.main(["split", str(folder), str(split_out), "--study", STUDY_A, "--body", body, *common]) == 0
    capsys.readouterr()
    assert cli.main(["anonymize", str(folder), str(split_out), *common]) == cli.EXIT_USAGE
    assert "which keeps original identifiers: de-identified files beside them would make no release" in \
        capsys.readouterr().err
