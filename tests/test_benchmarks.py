"""The benchmark scripts still run and report what the README quotes from them.

Tiny corpora (a generated study plus pydicom's CT_small), so these check the scripts'
plumbing and the invariants of their figures, never a speed: the copy is the 1.00 baseline
of both ratios, and the durable time (the same clock, stopped after ``os.sync()``) is never
shorter than the time to the page cache.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from transforms.workers import default_processes

from . import synthetic

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench_samples(tmp_path: Path) -> Path:
    folder = tmp_path / "samples"
    synthetic.write_study(synthetic.make_study(seed=11, n_ct=3), folder / "study")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "CT_small.dcm")
    (folder / "README.txt").write_text("not DICOM: left out of the corpus\n")
    return folder


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True, text=True, cwd=cwd, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_core_benchmark_reports_every_mode_with_durable_figures(bench_samples: Path, tmp_path: Path) -> None:
    done = _run("core.py", "--files", "24", "--runs", "1", "--phases", "--samples", str(bench_samples), cwd=tmp_path)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("6 distinct sample files replicated to 24 files")  # 5 generated + CT_small
    header = next(i for i, line in enumerate(lines) if line.startswith("mode"))
    assert lines[header].split()[-4:] == ["durable", "files/s", "vs", "copy"]
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in lines[header + 1 : header + 5]}
    assert list(rows) == ["copy", "read+write", "anonymize", "modify"]
    for name, (files_s, mb_s, ratio, cpu_files_s, cpu_ratio, user, system, durable_s, durable_ratio) in rows.items():
        assert files_s > 0 and mb_s > 0 and cpu_files_s > 0 and user >= 0 and system >= 0, name
        assert durable_s <= files_s + 1, name  # the same clock, stopped later (+1: rounding)
    assert rows["copy"][2] == rows["copy"][4] == rows["copy"][8] == 1.0
    phases = re.fullmatch(r"anonymize pass, CPU time per file: read (\d+) us, parse (\d+) us, anonymize (\d+) us, "
                          r"encode (\d+) us, sha256 (\d+) us, write (\d+) us; total (\d+) us", lines[-1])
    assert phases, lines[-1]
    *steps, total = (int(x) for x in phases.groups())
    assert abs(sum(steps) - total) <= len(steps) and steps[1] > 0 and steps[2] > 0  # rounding of each step


def test_pipeline_benchmark_writes_every_file_and_reports_durable_figures(bench_samples: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    work = tmp_path / "work"  # given, so the benchmark keeps every phase's output
    done = _run("pipeline.py", "--size-mb", "0.3", "--no-multi", "--no-beam-copy", "--json", str(out),
                "--samples", str(bench_samples), "--work", str(work), cwd=tmp_path)
    assert "warning:" not in done.stderr.replace("warning: creating a file", "")  # every file written
    rows = json.loads(out.read_text())
    processes = default_processes()
    expected = ["plain Python copy", f"dicom-deid anonymize (defaults: in-memory, {processes} processes)"]
    if processes:
        expected.append("dicom-deid anonymize (in-memory, --processes 0)")
    assert [r["what"] for r in rows] == expected
    files = rows[0]["files"]
    assert files >= 6 and all(r["files"] == files for r in rows)
    for row in rows:  # seconds are rounded to 0.01: the copy of a tiny corpus may show 0.0
        assert row["durable_seconds"] >= row["seconds"] >= 0
        assert 0 < row["durable_files_per_s"] <= row["files_per_s"] + 0.1
    for i, row in enumerate(rows):  # every variant really ran: one output per input file
        assert sum(1 for _ in (work / f"out-0-{i}").rglob("*.dcm")) == files, row["what"]
        if i:  # and the command's own summary agrees
            summary = json.loads((work / f"out-0-{i}-audit" / "summary.json").read_text())
            assert summary["Statuses"]["written"] == files, row["what"]
    assert rows[0]["ratio_to_copy"] == rows[0]["durable_ratio_to_copy"] == 1.0
    assert rows[0]["peak_tree_pss_MiB"] is None  # the copy runs in the benchmark's own process
    for row in rows[1:]:  # the command's whole process tree holds at least its main process
        assert row["peak_tree_pss_MiB"] > 20 and row["peak_rss_MiB"] > 20


def test_transcode_benchmark_reports_each_target_against_the_copy(bench_samples: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    rle, explicit = "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1"
    done = _run("transcode.py", "--samples", str(bench_samples), "--repeat", "1", "--targets", rle, explicit,
                "--no-verify-too", "--json", str(out), cwd=tmp_path)  # fmt: skip
    assert done.stdout.startswith("6 files (all sources)")  # 5 generated + CT_small; README.txt left out
    rows = json.loads(out.read_text())
    assert [(r["target"], r["verify"]) for r in rows] == [
        ("copy", None), ("none", True), (rle, True), (rle, False), (explicit, True), (explicit, False)]
    assert rows[0]["vs_copy"] == rows[1]["vs_none"] == 1.0 and rows[0]["out_over_in"] == 1.0
    for row in rows:
        assert (row["ok"], row["refused"]) == (6, 0), row  # every file, every target: lossless, no refusal
        assert row["files_per_s"] > 0 and row["files_per_wall_s"] > 0
        # (both figures are rounded in the JSON: 4 decimals, 0.1 files/s)
        assert row["vs_copy"] == pytest.approx(row["files_per_wall_s"] / rows[0]["files_per_wall_s"], rel=2e-3, abs=1e-4)
    assert rows[2]["out_over_in"] < 1.0  # RLE compresses the generated images


def test_splitmerge_benchmark_measures_the_grouping_against_the_copy(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    _run("splitmerge.py", "--instances", "100", "--workers", "1", "--repeat", "1", "--json", str(out), cwd=tmp_path)
    rows = {r["measure"]: r for r in json.loads(out.read_text())}
    assert list(rows) == [
        "plain file copy (baseline)", "header loop (plain Python)", "empty pipeline (overhead)",
        "index, split (no shuffle)", "index, merge (GroupByKey by study)", "in-memory entries, keyed",
        "in-memory entries, keyed + GroupByKey", "plan_merge over the index (driver)",
        "split end to end (2 passes)", "merge end to end (2 passes)"]  # fmt: skip
    assert rows["plain file copy (baseline)"]["vs_copy"] == 1.0
    # 100 instances = 2 studies x 2 series x 25: the split's study is one of them; the merge
    # moves the other study's 50 instances; the grouping leaves one group per study
    assert rows["plain file copy (baseline)"]["detail"] == "100 files"
    assert rows["header loop (plain Python)"]["detail"] == "100 entries"
    assert rows["index, split (no shuffle)"]["detail"] == "50 entries kept"
    assert rows["index, merge (GroupByKey by study)"]["detail"] == "100 entries kept"
    assert rows["in-memory entries, keyed + GroupByKey"]["detail"] == "2 groups"
    assert rows["plan_merge over the index (driver)"]["detail"] == "50 moved"
    assert rows["split end to end (2 passes)"]["detail"] == rows["merge end to end (2 passes)"]["detail"] == "exit 0"
    for name, row in rows.items():
        assert row["wall_s"] >= 0 and row["cpu_s"] >= 0, name
