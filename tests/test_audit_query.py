"""The audit is what a data manager queries: DuckDB reads the shards the run wrote, with the
types of schemas.audit, and the answers match the run's summary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipelines import cli
from tests.pipeline_support import write_key
from tests.synthetic import make_study, write_study

duckdb = pytest.importorskip("duckdb")


def test_duckdb_queries_the_audit_of_a_run(tmp_path: Path):
    folder = tmp_path / "in"
    write_study(make_study(seed=3, n_ct=2), folder / "study")
    (folder / "notes.txt").write_text("not DICOM\n")
    (folder / "empty.dcm").write_bytes(b"")
    out = tmp_path / "out"
    code = cli.main(["anonymize", str(folder), str(out), "--key-file", str(write_key(tmp_path)), "--quiet",
                     "--runner", "DirectRunner"])
    assert code == 3  # two inputs failed
    audit = f"{out}-audit/audit-*.parquet"
    by_status = duckdb.sql(
        f"select status, reason, count(*) as n from '{audit}' group by all order by all"
    ).fetchall()
    # 2 CT + RTSTRUCT + SR written; the text file and the empty file failed with their reason.
    assert by_status == [("failed", "empty", 1), ("failed", "not_dicom", 1), ("written", None, 4)]
    types = dict(duckdb.sql(f"select column_name, column_type from (describe select * from '{audit}')").fetchall())
    assert types["started_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["bytes_in"] == "BIGINT"
    [(studies,)] = duckdb.sql(
        f"select count(distinct study_instance_uid) from '{audit}' where status = 'written'"
    ).fetchall()
    assert studies == 1
    summary = json.loads((Path(f"{out}-audit") / "summary.json").read_text())
    assert summary["FailedInstancesCount"] == 2
    assert summary["InputFiles"] == 6
    [(total_out,)] = duckdb.sql(f"select sum(bytes_out) from '{audit}'").fetchall()
    assert total_out == sum(p.stat().st_size for p in out.rglob("*.dcm"))


def test_the_readme_audit_snippet_runs_on_a_run_s_audit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]):
    """The README's Python block, as written, over the audit of a run into ``out``."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    [block] = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:] if "duckdb.sql(" in b]
    folder = tmp_path / "in"
    write_study(make_study(seed=4, n_ct=1), folder / "study")
    (folder / "notes.txt").write_text("not DICOM\n")
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # a run and its rerun: the audit folder keeps both
        assert cli.main(["anonymize", "in", "out", "--key-file", str(write_key(tmp_path)), "--quiet",
                         "--runner", "DirectRunner"]) == 3
    capsys.readouterr()
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - our own README
    shown = capsys.readouterr().out
    every_run, last_run = shown.split("\n\n")[:2]
    # per run: 1 CT + RTSTRUCT + SR written, the text file failed
    assert re.search(r"written\W+NULL\W+6\b", every_run) and re.search(r"not_dicom\W+2\b", every_run)
    assert re.search(r"written\W+3\b", last_run) and re.search(r"failed\W+1\b", last_run)
    assert shown.rstrip().endswith("\n8")
