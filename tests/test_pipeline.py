"""The Beam pipeline end to end (DirectRunner in-memory and multi_processing), read back exactly."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest

from pipelines import cli
from pipelines import run as pipeline_run
from schemas.audit import AUDIT_SCHEMA, CROSSWALK_SCHEMA
from tests.pipeline_support import (
    IGNORE,
    KEY,
    SECRET,
    all_bytes_under,
    expected_row,
    output_files,
    read_rows,
    write_key,
)
from tests.synthetic import PLANTED, make_study, original_uids, write_study
from transforms import dicomio, files, request
from transforms.beam import TMP_DIR_NAME, DuplicateInstanceError, expand_input, publish

ANONYMIZE = request.parse_anonymize({})


@pytest.fixture
def study_folder(tmp_path: Path) -> Path:
    """Two synthetic studies (two patients: 3 CT + RTSTRUCT + SR each) and one text file."""
    folder = tmp_path / "in"
    write_study(make_study(seed=1), folder / "a")
    write_study(make_study(seed=2, patient_name="OTHERFAMILY^OTHERGIVEN", patient_id="PID-OTHER-0002"), folder / "b" / "deep")
    (folder / "notes.txt").write_text("not a DICOM file\n")
    return folder


def _run(tmp_path: Path, input_: Path | str, *extra: str, command: str = "anonymize", out: str = "out") -> tuple[int, Path, Path]:
    key = write_key(tmp_path)
    output = tmp_path / out
    code = cli.main([command, str(input_), str(output), "--key-file", str(key), "--quiet", *extra])
    return code, output, Path(str(output) + "-audit")


def _assert_matches_core(rows: list[dict], folder: Path, output: Path, plan=ANONYMIZE) -> None:
    """Every row equals what the pure core makes of its file; outputs are exactly the written rows."""
    written = {}
    for row in rows:
        exp = expected_row(Path(row["source_uri"]), plan)
        assert row["status"] == exp["status"], row["source_uri"]
        assert row["reason"] == exp["reason"], row["source_uri"]
        if exp["status"] == "written":
            assert row["output_uri"] == str(output / exp["name"])
            for column in (
                "output_sha256",
                "bytes_in",
                "bytes_out",
                "study_instance_uid",
                "series_instance_uid",
                "sop_instance_uid",
                "instance_orthanc_id",
                "series_orthanc_id",
                "study_orthanc_id",
                "patient_orthanc_id",
            ):
                assert row[column] == exp[column], (row["source_uri"], column)
            written[exp["name"]] = exp["output_sha256"]
        else:
            assert row["output_uri"] is None
    assert output_files(output) == written


# --------------------------------------------------------------------------- unit level


def test_expand_input_folder_glob_file_and_our_temporaries(tmp_path: Path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.dcm").write_bytes(b"1")
    (tmp_path / "a" / "b" / "two.dcm").write_bytes(b"22")
    (tmp_path / "a" / "b" / "three.txt").write_bytes(b"333")
    (tmp_path / "a" / TMP_DIR_NAME / "run").mkdir(parents=True)
    (tmp_path / "a" / TMP_DIR_NAME / "run" / "x.tmp").write_bytes(b"x")
    root = str(tmp_path / "a")
    assert sorted(expand_input(root)) == [(f"{root}/b/three.txt", 3), (f"{root}/b/two.dcm", 2), (f"{root}/one.dcm", 1)]
    assert sorted(expand_input(root + "/")) == sorted(expand_input(root))
    assert sorted(expand_input(root + "/**.dcm")) == [(f"{root}/b/two.dcm", 2), (f"{root}/one.dcm", 1)]
    assert sorted(expand_input(root + "/*.dcm")) == [(f"{root}/one.dcm", 1)]
    assert list(expand_input(root + "/b/two.dcm")) == [(f"{root}/b/two.dcm", 2)]
    assert list(expand_input(str(tmp_path / "missing"))) == []


def _beam_match(pattern: str) -> list[tuple[str, int]]:
    from apache_beam.io.filesystems import FileSystems

    return sorted((m.path, m.size_in_bytes) for m in FileSystems.match([pattern])[0].metadata_list)


def test_streaming_listing_matches_what_beam_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from transforms.beam import _match_streaming

    root = tmp_path / "in"
    (root / "a" / "deep" / "er").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(1500):  # more than one batch of one folder
        (root / "a" / f"{i:04d}.dcm").write_bytes(b"x" * (i % 7))
    (root / "a" / "deep" / "er" / "z.dcm").write_bytes(b"zz")
    (root / "b" / "two.dcm").write_bytes(b"22")
    (root / "b" / "t o.txt").write_bytes(b"333")
    (root / "b" / "link.dcm").symlink_to(root / "b" / "two.dcm")  # a symlinked file is listed
    (root / "b" / "broken.dcm").symlink_to(root / "b" / "absent.dcm")  # Beam drops a broken one; we list it
    (root / "c").symlink_to(root / "a", target_is_directory=True)  # a symlinked folder is not entered
    base = str(root)
    patterns = [f"{base}/**", f"{base}/*", f"{base}/**.dcm", f"{base}/*/*.dcm", f"{base}/b/*", f"{base}/b/t?o.dcm",
                f"{base}/[bc]/**", f"{base}/a/00*", f"{base}/a/deep/**", f"{base}/missing/**",
                f"{base}/a?deep/er/z.dcm", f"{base}/[!b]?deep?er/*.dcm"]  # fmt: skip
    reference = {p: _beam_match(p) for p in patterns}
    # Beam's "?" and negated sets match a "/" too: a pattern component holding them is no
    # reason to leave a folder unvisited.
    assert reference[f"{base}/a?deep/er/z.dcm"] == reference[f"{base}/[!b]?deep?er/*.dcm"] == [
        (f"{base}/a/deep/er/z.dcm", 2)]
    assert len(reference[f"{base}/**"]) == 1500 + 1 + 3  # a/, a/deep/er/, b/ (two, "t o", link)
    assert reference[f"{base}/missing/**"] == []

    def no_match(*args, **kwargs):
        raise AssertionError("local listing went through FileSystems.match")

    monkeypatch.setattr("apache_beam.io.filesystems.FileSystems.match", no_match)
    broken = (str(root / "b" / "broken.dcm"), 0)  # listed (size 0) so that it gets its audit row
    with_broken = {f"{base}/**", f"{base}/*/*.dcm", f"{base}/**.dcm", f"{base}/b/*", f"{base}/[bc]/**"}
    for pattern in patterns:
        expected = sorted(reference[pattern] + [broken]) if pattern in with_broken else reference[pattern]
        assert sorted(_match_streaming(pattern)) == expected, pattern


def test_a_local_input_is_listed_in_one_stage_a_bucket_in_two():
    import apache_beam as beam

    from transforms.beam import ExpandInput

    def names(uri: str, spread: bool = True) -> set[str]:
        pipeline = beam.Pipeline()
        _ = pipeline | beam.Create([uri]) | "ExpandInput" >> ExpandInput.of(uri, spread=spread)
        proto = pipeline.to_runner_api()
        return {t.unique_name for t in proto.components.transforms.values() if t.unique_name.startswith("ExpandInput/")}

    local = names("/data/in")
    assert {"ExpandInput/MatchFiles", "ExpandInput/SpreadFiles"} <= local
    assert not any("Prefixes" in n for n in local)
    assert {"ExpandInput/SpreadPrefixes", "ExpandInput/ListPrefixes", "ExpandInput/SpreadFiles"} <= names("gs://bucket/in")
    # A local run's worker pool: the listing streams into the DoFn that feeds it (a reshuffle
    # would hold every (path, size) in the runner's memory first); a bucket is still spread.
    assert names("/data/in", spread=False) == {"ExpandInput/MatchFiles"}
    assert "ExpandInput/SpreadFiles" in names("gs://bucket/in", spread=False)


@pytest.mark.parametrize(("processes", "spread"), [("1", False), ("0", True)])
def test_a_local_run_spreads_its_listing_only_without_a_worker_pool(tmp_path: Path, study_folder: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  processes: str, spread: bool):
    from pipelines import run as pipeline_run

    seen: list[bool] = []
    real_build = pipeline_run.build

    def build(*args, spread: bool = True, **kwargs):
        seen.append(spread)
        return real_build(*args, spread=spread, **kwargs)

    monkeypatch.setattr(pipeline_run, "build", build)
    code, output, _ = _run(tmp_path, study_folder, "--processes", processes, "--runner", "DirectRunner",
                           "--direct_num_workers", "1")
    assert code == 3 and seen == [spread]  # notes.txt failed
    assert len(list(output.rglob("*.dcm"))) == 10  # 3 CT + RTSTRUCT + SR of each study


def test_publish_local_is_create_if_absent(tmp_path: Path):
    out = tmp_path / "out"
    final = str(out / "1.2" / "3.4" / "5.6.dcm")
    data = b"first content"
    publish(data, hashlib.sha256(data).hexdigest(), final, str(out), "run1")
    publish(data, hashlib.sha256(data).hexdigest(), final, str(out), "run2")  # idempotent rerun
    other = b"other content"
    with pytest.raises(DuplicateInstanceError) as info:
        publish(other, hashlib.sha256(other).hexdigest(), final, str(out), "run1")
    assert info.value.reason == "duplicate_instance"
    assert Path(final).read_bytes() == data
    # temporaries are removed right away; only the run folders remain, empty
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["1.2/3.4/5.6.dcm"]


def test_publish_local_race_has_exactly_one_winner(tmp_path: Path):
    out = tmp_path / "out"
    final = str(out / "1" / "2" / "3.dcm")
    contents = [f"content {i}".encode() * 1000 for i in range(8)]
    outcomes: list[str | None] = [None] * len(contents)
    barrier = threading.Barrier(len(contents))

    def worker(i: int) -> None:
        barrier.wait()
        try:
            publish(contents[i], hashlib.sha256(contents[i]).hexdigest(), final, str(out), "race")
            outcomes[i] = "written"
        except DuplicateInstanceError:
            outcomes[i] = "duplicate"

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(contents))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("written") == 1
    assert outcomes.count("duplicate") == len(contents) - 1
    assert Path(final).read_bytes() == contents[outcomes.index("written")]


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("processes", ["0", "2"])
def test_in_memory_run_matches_core_exactly(tmp_path: Path, study_folder: Path, processes: str):
    """In Beam's process (``--processes 0``) and in two forked workers (transforms.workers)."""
    code, output, audit = _run(tmp_path, study_folder, "--processes", processes)
    assert code == cli.EXIT_SOME_FAILED  # the text file
    rows = read_rows(audit)
    assert len(rows) == 11
    assert pq.read_table(str(audit), ignore_prefixes=IGNORE).schema == AUDIT_SCHEMA
    by_name = {Path(r["source_uri"]).name: r for r in rows}
    assert (by_name["notes.txt"]["status"], by_name["notes.txt"]["reason"]) == ("failed", "not_dicom")
    assert [r["status"] for r in rows].count("written") == 10
    _assert_matches_core(rows, study_folder, output)
    # constant columns
    run_ids = {r["run_id"] for r in rows}
    assert len(run_ids) == 1
    assert {(r["operation"], r["profile"], r["level"], r["key_id"]) for r in rows} == {
        ("anonymize", "2023b", "Patient", KEY.key_id)
    }
    assert {r["modality"] for r in rows if r["status"] == "written"} == {"CT", "RTSTRUCT", "SR"}
    assert all(r["started_at"] <= r["finished_at"] for r in rows)
    # the summary: Orthanc's bulk answer plus counts
    summary = json.loads((audit / "summary.json").read_text())
    assert summary == json.loads((audit / f"summary-{run_ids.pop()}.json").read_text())
    assert {k: summary[k] for k in ("Description", "InstancesCount", "FailedInstancesCount", "IsAnonymization")} == {
        "Description": "dicom-deid anonymize",
        "InstancesCount": 11,
        "FailedInstancesCount": 1,
        "IsAnonymization": True,
    }
    assert summary["Statuses"] == {"written": 10, "failed": 1, "skipped": 0}
    assert summary["Reasons"] == {"not_dicom": 1}
    assert (summary["KeyId"], summary["Reproducible"], summary["Profile"]) == (KEY.key_id, True, "2023b")
    types = [r["Type"] for r in summary["Resources"]]
    assert types == ["Instance"] * 10 + ["Series"] * 6 + ["Study"] * 2 + ["Patient"] * 2
    written = [r for r in rows if r["status"] == "written"]
    assert [r["ID"] for r in summary["Resources"][:10]] == sorted(r["instance_orthanc_id"] for r in written)
    assert summary["Resources"][0]["Path"] == "/instances/" + summary["Resources"][0]["ID"]
    assert summary["Resources"][-1]["Path"] == "/patients/" + summary["Resources"][-1]["ID"]
    # de-identified: no planted PHI, no original UID, no key in outputs, audit or summary
    everything = all_bytes_under(output) + all_bytes_under(audit)
    originals = original_uids(make_study(seed=1)) | original_uids(make_study(seed=2))
    for value in [*PLANTED, "PID-OTHER-0002", *sorted(originals)]:
        assert value.encode() not in everything, value
    assert SECRET not in everything
    assert not (output / TMP_DIR_NAME).exists()


def test_rerun_is_idempotent(tmp_path: Path, study_folder: Path):
    code1, output, audit = _run(tmp_path, study_folder)
    first = output_files(output)
    code2, _, _ = _run(tmp_path, study_folder)
    assert (code1, code2) == (3, 3)
    assert output_files(output) == first
    rows = read_rows(audit)  # both runs' shards are kept; run_id tells them apart
    assert len(rows) == 22
    runs = sorted({r["run_id"] for r in rows})
    assert len(runs) == 2
    per_run = [
        sorted((r["source_uri"], r["status"], r["output_uri"], r["output_sha256"]) for r in rows if r["run_id"] == run)
        for run in runs
    ]
    assert per_run[0] == per_run[1]
    assert json.loads((audit / "summary.json").read_text())["RunId"] in runs


@pytest.mark.parametrize("processes", ["0", "2"])
def test_a_selected_file_that_fails_after_its_header_was_found(tmp_path: Path, processes: str,
                                                                capsys: pytest.CaptureFixture[str]):
    """A file a Resources entry names whose pixel data is cut short: its header matched, the
    whole read failed (truncated), and ``ResourcesNotFound`` used to list its entry as matching
    no input, against the audit's own failed row."""
    ct = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "cut.dcm").write_bytes(ct.read_bytes()[:-1000])
    (folder / "other.dcm").write_bytes(Path(pydicom.data.get_testdata_file("MR_small.dcm")).read_bytes())
    body = {"Resources": [str(pydicom.dcmread(ct).SOPInstanceUID), "1.2.3.404"]}
    code, output, audit = _run(tmp_path, folder, "--body", json.dumps(body), "--processes", processes)
    assert code == 3
    got = {Path(r["source_uri"]).name: (r["status"], r["reason"]) for r in read_rows(audit)}
    assert got == {"cut.dcm": ("failed", "truncated"), "other.dcm": ("skipped", "not_selected")}
    assert json.loads((audit / "summary.json").read_text())["ResourcesNotFound"] == [1]
    assert "1 of 2 Resources entries matched no input (positions 1, counting from 0)" in capsys.readouterr().err


def test_resources_select_by_uid_and_orthanc_id(tmp_path: Path, study_folder: Path, capsys: pytest.CaptureFixture[str]):
    study_a = make_study(seed=1)
    study_b = make_study(seed=2, patient_name="OTHERFAMILY^OTHERGIVEN", patient_id="PID-OTHER-0002")
    from transforms.orthanc_ids import orthanc_ids

    b_sr = study_b[-1]
    sr_instance_id = orthanc_ids(b_sr.PatientID, b_sr.StudyInstanceUID, b_sr.SeriesInstanceUID, b_sr.SOPInstanceUID)
    body = {"Resources": [study_a[0].StudyInstanceUID, "1.2.3.404", sr_instance_id["instance"].upper()]}
    code, output, audit = _run(tmp_path, study_folder, "--body", json.dumps(body))
    rows = read_rows(audit)
    got = {Path(r["source_uri"]).relative_to(study_folder).as_posix(): (r["status"], r["reason"]) for r in rows}
    assert got == {
        "a/000_CT.dcm": ("written", None),
        "a/001_CT.dcm": ("written", None),
        "a/002_CT.dcm": ("written", None),
        "a/003_RTSTRUCT.dcm": ("written", None),
        "a/004_SR.dcm": ("written", None),
        "b/deep/000_CT.dcm": ("skipped", "not_selected"),
        "b/deep/001_CT.dcm": ("skipped", "not_selected"),
        "b/deep/002_CT.dcm": ("skipped", "not_selected"),
        "b/deep/003_RTSTRUCT.dcm": ("skipped", "not_selected"),
        "b/deep/004_SR.dcm": ("written", None),
        "notes.txt": ("failed", "not_dicom"),
    }
    assert len(output_files(output)) == 6
    summary = json.loads((audit / "summary.json").read_text())
    assert (summary["InstancesCount"], summary["FailedInstancesCount"]) == (7, 1)
    assert summary["Statuses"] == {"written": 6, "failed": 1, "skipped": 4}
    assert summary["Reasons"] == {"not_dicom": 1, "not_selected": 4}
    assert summary["ResourcesNotFound"] == [1]  # positions only: no identifier is echoed
    assert not list(audit.glob(".matched-*"))
    assert "dicom-deid: warning: 1 of 3 Resources entries matched no input (positions 1, counting from 0)\n" in capsys.readouterr().err
    assert code == 3


def test_files_a_selection_leaves_alone_are_decided_by_their_header(tmp_path: Path, study_folder: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    """A bulk selection reads whole only the files it selects (and those whose header does not
    read, to say why they fail): the others are skipped from their header, a truncated image
    among them too (its pixels are not looked at); the selected ones are checked in full."""
    study_a = make_study(seed=1)
    victim = study_folder / "b" / "deep" / "000_CT.dcm"
    victim.write_bytes(victim.read_bytes()[:-50])  # another study's CT, its pixel data cut
    read_whole: list[str] = []
    real = files.read_input
    monkeypatch.setattr(files, "read_input", lambda path, *args: read_whole.append(path) or real(path, *args))
    body = {"Resources": [study_a[0].StudyInstanceUID]}
    code, output, audit = _run(tmp_path, study_folder, "--body", json.dumps(body), "--processes", "0")
    got = {Path(r["source_uri"]).relative_to(study_folder).as_posix(): (r["status"], r["reason"], r["modality"])
           for r in read_rows(audit)}
    assert got["b/deep/000_CT.dcm"] == ("skipped", "not_selected", "CT")
    assert got["b/deep/004_SR.dcm"] == ("skipped", "not_selected", "SR")
    assert sorted(Path(p).relative_to(study_folder).as_posix() for p in read_whole) == [
        "a/000_CT.dcm", "a/001_CT.dcm", "a/002_CT.dcm", "a/003_RTSTRUCT.dcm", "a/004_SR.dcm", "notes.txt"]
    assert code == 3 and len(output_files(output)) == 5  # notes.txt failed (not_dicom)


@pytest.mark.parametrize("command", ["modify", "anonymize"])
def test_bulk_selection_of_one_instance_lists_its_resources(tmp_path: Path, study_folder: Path, command: str):  # TC-26
    """/tools/bulk-modify on one instance: a new Instance in the same Series, Study and Patient;
    /tools/bulk-anonymize: four new resources."""
    from transforms.orthanc_ids import orthanc_ids

    ct = make_study(seed=1)[1]
    source = orthanc_ids(ct.PatientID, ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    body = {"Resources": [source["instance"]]}
    code, _, audit = _run(tmp_path, study_folder, "--body", json.dumps(body), command=command)
    summary = json.loads((audit / "summary.json").read_text())
    listed = {(r["Type"], r["ID"]) for r in summary["Resources"]}
    assert sorted(kind for kind, _ in listed) == ["Instance", "Patient", "Series", "Study"]
    ids = {kind: rid for kind, rid in listed}
    assert ids["Instance"] != source["instance"]
    if command == "modify":  # Instance level: only the SOP Instance UID changes
        assert (ids["Series"], ids["Study"], ids["Patient"]) == (source["series"], source["study"], source["patient"])
    else:
        assert not {ids["Series"], ids["Study"], ids["Patient"]} & {source["series"], source["study"], source["patient"]}
    assert summary["Statuses"] == {"written": 1, "failed": 1, "skipped": 9}
    assert summary["IsAnonymization"] is (command == "anonymize")
    assert code == 3  # notes.txt


def test_many_unmatched_resources_are_counted_not_all_listed(tmp_path: Path, study_folder: Path, capsys: pytest.CaptureFixture[str]):
    study_a = make_study(seed=1)
    body = {"Resources": [study_a[0].StudyInstanceUID] + [f"1.2.3.{i}" for i in range(25)]}
    code, _, audit = _run(tmp_path, study_folder, "--body", json.dumps(body))
    assert code == 3  # notes.txt
    summary = json.loads((audit / "summary.json").read_text())
    assert summary["ResourcesNotFound"] == list(range(1, 26))  # the file keeps every position
    shown = ", ".join(str(i) for i in range(1, 21))
    assert (
        f"dicom-deid: warning: 25 of 26 Resources entries matched no input (positions {shown} and 5 more, counting from 0)\n"
        in capsys.readouterr().err
    )


def test_a_selected_study_reports_its_match_once_per_bundle(tmp_path: Path):
    """WriteMatches gets one line per Resources entry and bundle, not one per instance."""
    from apache_beam import pvalue

    from transforms.beam import MATCHED_TAG, DeidentifyFn, RunConfig
    from transforms.identity import Key

    study = make_study(seed=1)
    write_study(study, tmp_path / "in")
    body = {"Resources": [study[0].StudyInstanceUID, study[-1].SOPInstanceUID, "1.2.3.404"]}
    key = Key.from_bytes(SECRET)
    cfg = RunConfig(plan=request.parse_anonymize(body), output_root=str(tmp_path / "out"), run_id="r1", key_id=key.key_id, key=key)
    fn = DeidentifyFn(cfg)
    fn.setup()
    try:
        matched_per_bundle, audit_rows = [], 0
        for _ in range(2):
            fn.start_bundle()
            outputs = [o for path in sorted((tmp_path / "in").iterdir()) for o in fn.process((str(path), path.stat().st_size))]
            outputs += list(fn.finish_bundle())
            matched_per_bundle.append(sorted(o.value for o in outputs if isinstance(o, pvalue.TaggedOutput) and o.tag == MATCHED_TAG))
            audit_rows += sum(1 for o in outputs if not isinstance(o, pvalue.TaggedOutput))
    finally:
        fn.teardown()
    assert matched_per_bundle == [[0, 1], [0, 1]]  # 5 instances of the study, the SR by its UID too
    assert audit_rows == 2 * 5


def test_a_bulk_selection_of_many_uids_is_indexed_once(tmp_path: Path):
    """50,000 Resources entries: each file finds its positions (a study named twice, an
    instance by its upper-case Orthanc id); the entries are normalised once per plan."""
    from transforms import files
    from transforms.beam import RunConfig, process_file
    from transforms.identity import Key
    from transforms.orthanc_ids import orthanc_ids

    study = make_study(seed=3)
    write_study(study, tmp_path / "in")
    sr = study[-1]
    entries = [f"1.2.826.0.1.3680043.2.1125.{i}" for i in range(50_000)]
    entries[40_000] = entries[49_999] = study[0].StudyInstanceUID
    entries[7] = orthanc_ids(sr.PatientID, sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID)["instance"].upper()
    plan = request.parse_anonymize({"Resources": entries})
    key = Key.from_bytes(SECRET)
    cfg = RunConfig(plan=plan, output_root=str(tmp_path / "out"), run_id="r", key_id=key.key_id, key=key)
    found = {}
    for path in sorted((tmp_path / "in").iterdir()):
        matched: list[int] = []
        row, _ = process_file(str(path), path.stat().st_size, cfg, key, matched=matched)
        assert row["status"] == "written"
        found[path.name] = matched
    assert found == {
        "000_CT.dcm": [40_000, 49_999],
        "001_CT.dcm": [40_000, 49_999],
        "002_CT.dcm": [40_000, 49_999],
        "003_RTSTRUCT.dcm": [40_000, 49_999],
        "004_SR.dcm": [7, 40_000, 49_999],
    }
    index = files._selection(plan)
    assert files._selection(plan) is index  # built once for the plan
    assert len(index) == 50_000 - 1
    # Each DoFn instance unpickles its own plan (Dataflow runs several bundles per process):
    # instances taking turns keep their indexes instead of rebuilding them for every file.
    twins = [pickle.loads(pickle.dumps(plan)) for _ in range(8)]
    indexes = [files._selection(twin) for twin in twins]
    assert all(files._selection(twin) is built for twin, built in zip(twins, indexes))
    assert files._selection(plan) is index and indexes[0] == index and indexes[0] is not index


def test_crosswalk_holds_originals_and_audit_does_not(tmp_path: Path, study_folder: Path):
    crosswalk = tmp_path / "custodian" / "crosswalk"
    code, output, audit = _run(tmp_path, study_folder, "--crosswalk", str(crosswalk))
    rows = {r["source_uri"]: r for r in read_rows(audit)}
    table = pq.read_table(str(crosswalk), ignore_prefixes=IGNORE)
    assert table.schema == CROSSWALK_SCHEMA
    cross = {r["source_uri"]: r for r in table.to_pylist()}
    assert len(cross) == 10  # written files only
    study_a = {f"{i:03d}": ds for i, ds in enumerate(make_study(seed=1))}
    for source, c in cross.items():
        row = rows[source]
        assert (c["output_uri"], c["run_id"], c["key_id"]) == (row["output_uri"], row["run_id"], row["key_id"])
        assert (c["new_study_instance_uid"], c["new_series_instance_uid"], c["new_sop_instance_uid"]) == (
            row["study_instance_uid"],
            row["series_instance_uid"],
            row["sop_instance_uid"],
        )
        assert c["new_instance_orthanc_id"] == row["instance_orthanc_id"]
        if "/a/" in source:
            ds = study_a[Path(source).name[:3]]
            assert (
                c["original_patient_id"],
                c["original_study_instance_uid"],
                c["original_series_instance_uid"],
                c["original_sop_instance_uid"],
            ) == ("PID-PLANTED-0001", ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    audit_bytes = all_bytes_under(audit)
    for c in cross.values():
        for column in ("original_patient_id", "original_study_instance_uid", "original_sop_instance_uid"):
            assert c[column].encode() not in audit_bytes
    assert json.loads((audit / "summary.json").read_text())["Crosswalk"] == str(crosswalk)


def test_two_inputs_one_output_name_is_duplicate_instance(tmp_path: Path):
    folder = tmp_path / "in"
    ct = make_study(seed=3, n_ct=1, rtstruct=False, sr=False)[0]
    write_study([ct], folder / "first")
    changed = make_study(seed=3, n_ct=1, rtstruct=False, sr=False)[0]
    changed.PixelData = bytes(reversed(changed.PixelData))  # other pixels, same SOPInstanceUID
    write_study([changed], folder / "second")
    code, output, audit = _run(tmp_path, folder)
    rows = read_rows(audit)
    assert sorted((r["status"], r["reason"]) for r in rows) == [("failed", "duplicate_instance"), ("written", None)]
    winner = next(r for r in rows if r["status"] == "written")
    loser = next(r for r in rows if r["status"] == "failed")
    # the loser names the contested identifiers so the pair can be found
    assert loser["sop_instance_uid"] == winner["sop_instance_uid"]
    assert loser["output_uri"] is None
    assert output_files(output) == {winner["output_uri"][len(str(output)) + 1 :]: winner["output_sha256"]}
    assert code == cli.EXIT_SOME_FAILED


def test_modify_with_level(tmp_path: Path, study_folder: Path):
    body = {"Replace": {"StudyDescription": "relabelled"}}
    code, output, audit = _run(tmp_path, study_folder, "--body", json.dumps(body), "--level", "Series", command="modify")
    rows = read_rows(audit)
    plan = request.parse_modify(body, level="Series")
    _assert_matches_core(rows, study_folder, output, plan)
    written = [r for r in rows if r["status"] == "written"]
    assert {(r["operation"], r["profile"], r["level"]) for r in rows} == {("modify", None, "Series")}
    # Series level keeps the original StudyInstanceUIDs
    originals = {make_study(seed=1)[0].StudyInstanceUID, make_study(seed=2)[0].StudyInstanceUID}
    assert {r["study_instance_uid"] for r in written} == originals
    assert code == 3


def test_multi_threading_matches_the_core_and_restores_the_switch_interval(tmp_path: Path, study_folder: Path):
    """Four DoFn threads in this process share one memory budget and the key's cache; the GIL
    switch interval is lowered only while a single DeidentifyFn is live, and restored after."""
    import sys

    before = sys.getswitchinterval()
    code, output, audit = _run(tmp_path, study_folder, "--direct_running_mode", "multi_threading",
                               "--direct_num_workers", "4")
    rows = read_rows(audit)
    assert len(rows) == 11  # 2 x (3 CT + RTSTRUCT + SR) + the text file
    _assert_matches_core(rows, study_folder, output)
    assert sorted((r["status"], r["reason"]) for r in rows)[-1] == ("written", None)
    assert [r["reason"] for r in rows if r["status"] == "failed"] == ["not_dicom"]
    assert code == cli.EXIT_SOME_FAILED
    assert sys.getswitchinterval() == before


# The shared samples' four failures, from the files themselves rather than from the code under
# test (the README counts them: "4 of 176 input files failed"): README.md is text; the C-FIND
# query is an identifier (QueryRetrieveLevel IMAGE) whose SOPClassUID and SOPInstanceUID are
# empty; each pair holds two different files with one SOPInstanceUID, so they map to one output
# name and the second to arrive fails. _assert_the_four_known_failures checks this with pydicom.
SHARED_SOP_PAIRS = (("DummyCT.dcm", "DummyCT-overwrite.dcm"),
                    ("Comunix/Ct/IM-0001-0001.dcm", "WithEmptyPatientComments.dcm"))


def _assert_the_four_known_failures(samples: Path) -> None:
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(samples / "README.md")
    query = pydicom.dcmread(samples / "ZeissOCT-cfind-query.dcm", force=True)
    assert (query.QueryRetrieveLevel, query.SOPClassUID, query.SOPInstanceUID) == ("IMAGE", "", "")
    for first, second in SHARED_SOP_PAIRS:
        a, b = (pydicom.dcmread(samples / f, stop_before_pixels=True).SOPInstanceUID for f in (first, second))
        assert a == b and (samples / first).read_bytes() != (samples / second).read_bytes()
    sops = [pydicom.dcmread(p, force=True, stop_before_pixels=True).get("SOPInstanceUID")
            for p in samples.rglob("*.dcm")]
    assert len(sops) - len(set(sops)) == len(SHARED_SOP_PAIRS)  # no other file shares a UID


def test_multi_processing_equals_in_memory_on_shared_samples(tmp_path: Path, samples: Path):
    code1, out1, audit1 = _run(tmp_path, samples, "--direct_running_mode", "in_memory", out="mem")
    code2, out2, audit2 = _run(
        tmp_path, samples, "--direct_running_mode", "multi_processing", "--direct_num_workers", "2", out="mp"
    )
    rows1, rows2 = read_rows(audit1), read_rows(audit2)
    n_files = sum(1 for p in samples.rglob("*") if p.is_file())
    assert len(rows1) == len(rows2) == n_files == 176
    _assert_the_four_known_failures(samples)
    for rows in (rows1, rows2):
        failed = {Path(r["source_uri"]).relative_to(samples).as_posix(): r["reason"] for r in rows if r["status"] != "written"}
        assert len(failed) == 4 and sum(r["status"] == "written" for r in rows) == 172
        assert {f: failed.get(f) for f in ("README.md", "ZeissOCT-cfind-query.dcm")} == {
            "README.md": "not_dicom", "ZeissOCT-cfind-query.dcm": "invalid_uid"}  # fmt: skip
        for pair in SHARED_SOP_PAIRS:  # one of each pair keeps the name; which one is the order's
            assert sorted(str(failed.get(f)) for f in pair) == ["None", "duplicate_instance"], pair
    for rows, output in ((rows1, out1), (rows2, out2)):
        dup_names = {r["sop_instance_uid"] for r in rows if r["reason"] == "duplicate_instance"}
        plain = [r for r in rows if r["sop_instance_uid"] not in dup_names]
        for row in plain:
            exp = expected_row(Path(row["source_uri"]), ANONYMIZE)
            assert (row["status"], row["reason"]) == (exp["status"], exp["reason"]), row["source_uri"]
            if exp["status"] == "written":
                assert (row["output_uri"], row["output_sha256"]) == (str(output / exp["name"]), exp["output_sha256"])
        # colliding inputs: exactly one winner per name, whose bytes are on disk
        for sop in dup_names:
            group = [r for r in rows if r["sop_instance_uid"] == sop]
            assert sorted(r["status"] for r in group) == ["failed"] * (len(group) - 1) + ["written"]
        files = output_files(output)
        assert files == {
            r["output_uri"][len(str(output)) + 1 :]: r["output_sha256"] for r in rows if r["status"] == "written"
        }
    # same fate for every input, except which of two colliding inputs wins the name
    contested = set()
    for rows in (rows1, rows2):
        dup = {r["sop_instance_uid"] for r in rows if r["reason"] == "duplicate_instance"}
        contested |= {r["source_uri"] for r in rows if r["sop_instance_uid"] in dup}

    def fate(rows):
        return sorted((r["source_uri"], r["status"], r["reason"], r["output_sha256"]) for r in rows if r["source_uri"] not in contested)

    assert fate(rows1) == fate(rows2)
    assert len(fate(rows1)) == n_files - len(contested) > 0
    assert (code1, code2) == (3, 3)  # the samples include a README and a C-FIND query file


@pytest.mark.parametrize("target", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"])
def test_transcode_mixed_folder_fills_syntax_columns(tmp_path: Path, samples: Path, target: str):
    folder = samples / "TransferSyntaxes"
    body = {"Transcode": target}
    code, output, audit = _run(tmp_path, folder, "--body", json.dumps(body))
    rows = read_rows(audit)
    _assert_matches_core(rows, folder, output, request.parse_anonymize(body))
    assert len(rows) == len(list(folder.iterdir()))
    for row in rows:
        source_syntax = dicomio.transfer_syntax_of(dicomio.read_dataset(Path(row["source_uri"]).read_bytes()))
        assert row["transfer_syntax_in"] == source_syntax
        if row["status"] == "written":
            assert row["transfer_syntax_out"] == target
            assert pydicom.dcmread(row["output_uri"], stop_before_pixels=True).file_meta.TransferSyntaxUID == target
        else:
            assert (row["reason"], row["transfer_syntax_out"]) == ("cannot_transcode", None)
            assert row["detail"].startswith(f"transcode: Transcode to {target}")
    statuses = [r["status"] for r in rows]
    assert code == (0 if "failed" not in statuses else 3)
    assert "written" in statuses
    summary = json.loads((audit / "summary.json").read_text())
    assert summary["Transcode"] == target


def test_local_direct_runner_never_tries_prism(monkeypatch: pytest.MonkeyPatch):
    import apache_beam as beam
    from apache_beam.runners.portability import prism_runner

    calls = []

    def fake_run(self, pipeline, options):
        calls.append(1)
        raise RuntimeError("prism is not available in this test")

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", fake_run)
    options = pipeline_run.pipeline_options([])
    with pipeline_run.make_pipeline(options) as p:
        p | beam.Create([1, 2]) | beam.Map(lambda x: x)
    assert calls == []
    # Beam's own DirectRunner name does try Prism first (what LocalDirectRunner avoids)
    with beam.Pipeline(runner="DirectRunner", options=options) as p:
        p | beam.Create([1, 2]) | beam.Map(lambda x: x)
    assert calls == [1]


def test_pipeline_options_default_runner_and_unknown_options():
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    options = pipeline_run.pipeline_options(["--direct_num_workers", "2"])
    assert options.view_as(StandardOptions).runner == "DirectRunner"
    assert options.view_as(DirectOptions).direct_num_workers == 2
    with pytest.raises(pipeline_run.UnknownOptions, match="--no_such_option"):
        pipeline_run.pipeline_options(["--no_such_option", "3"])


@pytest.mark.parametrize(("given", "runner"), [
    ("direct", "DirectRunner"), ("Direct", "DirectRunner"), ("directrunner", "DirectRunner"),
    ("apache_beam.runners.direct.direct_runner.DirectRunner", "DirectRunner"), ("dataflow", "DataflowRunner"),
    ("prism", "PrismRunner"), ("my.company.Runner", "my.company.Runner"),
])
def test_runner_names_are_read_as_beam_reads_them(given: str, runner: str):
    """Beam takes any case, with or without "Runner", and qualified names: the command's own
    checks (a local runner, where the key may go) must see the runner Beam will start."""
    from apache_beam.options.pipeline_options import StandardOptions

    assert pipeline_run.pipeline_options(["--runner", given]).view_as(StandardOptions).runner == runner


def test_a_runner_name_beam_does_not_know_is_refused():
    """Beam's create_runner refuses a short name it does not know; the command used to pass it
    on as a remote runner (test_cli: a misspelt runner is named as such)."""
    with pytest.raises(pipeline_run.UnknownOptions, match="^--runner 'mystery': not a Beam runner"):
        pipeline_run.pipeline_options(["--runner", "mystery"])


def test_a_local_runner_named_in_lower_case_runs_with_local_paths_and_key(tmp_path: Path, study_folder: Path):
    args = ["anonymize", str(study_folder), str(tmp_path / "out"), "--key-file", str(write_key(tmp_path)),
            "--quiet", "--runner", "direct"]
    assert cli.main(args) == 3  # the text file fails (refused before: "a remote runner", local paths)
    rows = read_rows(tmp_path / "out-audit")
    assert [(r["status"], r["reason"]) for r in rows].count(("written", None)) == 10
    assert [r["reason"] for r in rows if r["status"] != "written"] == ["not_dicom"]


def test_audit_default_location_is_a_sibling(tmp_path: Path, study_folder: Path):
    code, output, audit = _run(tmp_path, study_folder)
    assert audit == tmp_path / "out-audit"
    assert sorted(p.name for p in audit.iterdir() if p.suffix == ".json") == sorted(
        ["summary.json", f"summary-{read_rows(audit)[0]['run_id']}.json"]
    )
    assert not any(p.suffix == ".parquet" for p in output.rglob("*"))
    assert os.listdir(output)  # the outputs themselves


def test_a_glob_star_matches_names_with_a_backslash(tmp_path: Path):
    """Found by a review: Beam's "*" stops at a backslash too (a Windows separator), so
    "back\\slash.dcm" (a Windows upload's name) vanished from a glob run without an audit row;
    "*" stops at "/" only, as the README says."""
    from transforms.beam import _match_streaming

    (tmp_path / "ser\\1").mkdir()
    for name in ("plain.dcm", "back\\slash.dcm", "ser\\1/img.dcm"):
        (tmp_path / name).write_bytes(b"x")
    assert sorted(_match_streaming(f"{tmp_path}/*.dcm")) == [
        (f"{tmp_path}/back\\slash.dcm", 1), (f"{tmp_path}/plain.dcm", 1)]
    assert sorted(_match_streaming(f"{tmp_path}/*/*.dcm")) == [(f"{tmp_path}/ser\\1/img.dcm", 1)]
    assert sorted(_match_streaming(f"{tmp_path}/ser[\\]1/*")) == [(f"{tmp_path}/ser\\1/img.dcm", 1)]


def test_a_glob_lists_names_that_are_not_utf8(tmp_path: Path):
    """Matched on the real name, listed under its printable form (size -1: a read_error row)."""
    from transforms.beam import _match_streaming
    from transforms.files import UNREADABLE_NAME

    (tmp_path / "a.dcm").write_bytes(b"a")
    try:
        with open(os.path.join(os.fsencode(tmp_path), b"lat\xe9.dcm"), "wb") as f:
            f.write(b"b")
    except OSError:
        pytest.skip("this filesystem refuses file names that are not UTF-8")
    assert sorted(_match_streaming(f"{tmp_path}/*.dcm")) == [
        (f"{tmp_path}/a.dcm", 1), (f"{tmp_path}/lat\\xe9.dcm", UNREADABLE_NAME)]
