"""The ``dicom-deid`` command: one-file mode, request/key/location handling, exit statuses."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from pipelines import cli
from tests.pipeline_support import KEY, SECRET, all_bytes_under, expected_row, read_rows, write_key
from tests.synthetic import make_study, write_study
from transforms import request
from transforms.identity import ENV_VAR, Key

CT = Path(get_testdata_file("CT_small.dcm"))
DICTIONARY = {"4321,1012": ["LO", "RadioButton3", 1, 1, "RadioLogic"]}


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("dicom-deid: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


# --------------------------------------------------------------------------- one-file mode


def test_single_file_anonymize_equals_core(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "sub" / "out.dcm"
    code = cli.main(["anonymize", str(CT), str(out), "--key-file", str(write_key(tmp_path))])
    assert code == 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "")
    exp = expected_row(CT, request.parse_anonymize({}))
    import hashlib

    assert hashlib.sha256(out.read_bytes()).hexdigest() == exp["output_sha256"]
    assert [p.name for p in out.parent.iterdir()] == ["out.dcm"]  # no temporary left beside it


def test_single_file_modify_with_config_dictionary_and_level(tmp_path: Path):
    config = tmp_path / "modify.json"
    config.write_text(
        json.dumps({"Replace": {"4321,1012": "Yes", "StudyDescription": "relabelled"}, "PrivateCreator": "RadioLogic", "Dictionary": DICTIONARY})
    )
    out = tmp_path / "out.dcm"
    code = cli.main(["modify", str(CT), str(out), "--config", str(config), "--level", "Series", "--key-file", str(write_key(tmp_path))])
    assert code == 0
    ds, orig = pydicom.dcmread(out), pydicom.dcmread(CT)
    assert ds.StudyDescription == "relabelled"
    assert ds.StudyInstanceUID == orig.StudyInstanceUID  # Series level keeps the study
    assert ds.SeriesInstanceUID != orig.SeriesInstanceUID
    assert ds.SOPInstanceUID != orig.SOPInstanceUID
    assert ds[0x4321, 0x1012].value == "Yes"  # the private tag the Dictionary declares


def test_single_file_refused_body_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "out.dcm"
    code = cli.main(["modify", str(CT), str(out), "--body", '{"Replace": {"Rows": "abc"}}'])
    line = _one_line_error(capsys.readouterr().err)
    assert code == cli.EXIT_USAGE
    assert "Rows" in line
    assert not out.exists()


def test_dictionary_names_private_tags(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    body = {"Replace": {"RadioButton3": "Yes"}, "PrivateCreator": "RadioLogic"}
    code = cli.main(["modify", str(CT), str(tmp_path / "o.dcm"), "--body", json.dumps(body)])
    assert "unknown tag 'RadioButton3'" in _one_line_error(capsys.readouterr().err)
    assert code == cli.EXIT_USAGE
    config = tmp_path / "modify.json"
    config.write_text(json.dumps({**body, "Dictionary": DICTIONARY}))
    code = cli.main(["modify", str(CT), str(tmp_path / "o.dcm"), "--config", str(config), "--key-file", str(write_key(tmp_path))])
    assert code == 0
    assert pydicom.dcmread(tmp_path / "o.dcm")[0x4321, 0x1012].value == "Yes"


def test_single_file_unreadable_input_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(CT.read_bytes()[:1000])
    out = tmp_path / "out.dcm"
    code = cli.main(["anonymize", str(bad), str(out), "--key-file", str(write_key(tmp_path))])
    line = _one_line_error(capsys.readouterr().err)
    assert code == cli.EXIT_SOME_FAILED
    assert line.startswith(f"dicom-deid: {bad}: truncated: parse: ")
    assert sorted(tmp_path.iterdir()) == sorted([tmp_path / "deid.key", bad])  # nothing partial


def test_single_file_audit_on_request(tmp_path: Path):
    audit = tmp_path / "audit"
    out = tmp_path / "out.dcm"
    code = cli.main(["anonymize", str(CT), str(out), "--key-file", str(write_key(tmp_path)), "--audit", str(audit)])
    assert code == 0
    (row,) = read_rows(audit)
    assert (row["source_uri"], row["output_uri"], row["status"]) == (str(CT), str(out), "written")
    summary = json.loads((audit / "summary.json").read_text())
    assert (summary["InstancesCount"], summary["FailedInstancesCount"]) == (1, 0)
    assert [r["Type"] for r in summary["Resources"]] == ["Instance", "Series", "Study", "Patient"]


# --------------------------------------------------------------------------- request and usage errors


def _nested_items(levels: int) -> list:
    value: list = [{"ReferencedSOPInstanceUID": "1.2.3"}]
    for _ in range(levels - 1):
        value = [{"ReferencedSOPInstanceUID": "1.2.3", "ReferencedImageSequence": value}]
    return value


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--body", '{"Replace" {}}'], "dicom-deid: --body: invalid JSON at line 1 column 12: Expecting ':' delimiter"),
        # JSON5 reads the unquoted key `bad`, so the place shown is after it, where `:` is missing
        (["--body", "{bad json"], "dicom-deid: --body: invalid JSON at line 1 column 6: unexpected character"),
        # a comment before the error: the place is json5's, not the comment's
        (["--body", '// a comment\n{"Keep": ["PatientName"]\n "Remove": []}'], "dicom-deid: --body: invalid JSON at line 3 column 2: unexpected character"),
        (["--body", '/* open */ {"Keep": ["Pat'], "dicom-deid: --body: invalid JSON at line 1 column 26: unexpected end of input"),
        (["--body", '{"Keep": []} {}'], "dicom-deid: --body: invalid JSON at line 1 column 14: Extra data"),
        (["--body", '{"Replace": {"SliceThickness": NaN}}'], "dicom-deid: --body: invalid JSON: NaN is not a JSON number"),
        (["--body", '{"Replace": {"PatientName": "A"}, "Replace": {"PatientID": "B"}}'],
         "dicom-deid: --body: key 'Replace' is given twice in one object (Orthanc would keep the last one silently); give it once"),
        (["--body", '{"Replace": {"PatientName": "A", "0010,0010": "B", "PatientName": "C"}}'],
         "dicom-deid: --body: key 'PatientName' is given twice in one object (Orthanc would keep the last one silently); give it once"),
        (["--body", '{"Keep": [], // oops\n "Keep": ["PatientName"]}'],
         "dicom-deid: --body: key 'Keep' is given twice in one object (Orthanc would keep the last one silently); give it once"),
        (["--body", "[1, 2]"], "dicom-deid: --body: the request body must be a JSON object, not array"),
        (["--body", "{}", "--config", "x.json"], "dicom-deid: argument --config: not allowed with argument --body (see `dicom-deid anonymize --help`)"),
        (["--max-bytes", "lots"], "dicom-deid: argument --max-bytes: expected a size such as 2GiB, 500MB or 1048576, not 'lots' (see `dicom-deid anonymize --help`)"),
        (["--no_such_beam_option", "1"], "dicom-deid: unknown option(s): --no_such_beam_option 1 (not a dicom-deid option nor a Beam pipeline option)"),
        (["--level", "Patient"], "dicom-deid: --level is an option of modify: an anonymization replaces the identifiers "
         "of every level (a Level in its body is ignored, as in Orthanc)"),
        (["--level=Study"], "dicom-deid: --level is an option of modify: an anonymization replaces the identifiers"),
        (["--body", "[" * 5000 + "]" * 5000], "dicom-deid: --body: JSON nested too deeply"),
        # Python's limit on integer digits raised a plain ValueError: "internal error", exit 1
        (["--body", '{"Replace": {"Rows": ' + "9" * 5000 + "}}"],
         f"dicom-deid: --body: invalid JSON: a number with more digits than can be read (at most {sys.get_int_max_str_digits():,})"),
        (["--config", "/dev/zero"], "dicom-deid: --config '/dev/zero': larger than 64 MiB: not a request body"),
        (["--body", json.dumps({"Replace": {"ReferencedImageSequence": _nested_items(100)}})],
         "dicom-deid: Replace: values nested more than 64 sequence levels deep (the most a DICOM file read here may hold)"),
        (["--direct_running_mode", "fast"], "dicom-deid: Beam option: argument --direct_running_mode: invalid choice: 'fast' (choose from 'in_memory', 'multi_threading', 'multi_processing')"),
        (["--direct_num_workers", "two"], "dicom-deid: Beam option: argument --direct_num_workers: invalid int value: 'two'"),
        # Beam takes these, then fails mid-run (IndexError; ImportError when it first pickles)
        (["--direct_num_workers", "-1"], "dicom-deid: Beam options: --direct_num_workers must be 0 (all cores) or more, got -1"),
        pytest.param(["--pickle_library", "dill"], "dicom-deid: Beam options: --pickle_library dill: the dill package is "
                     "not installed (pip install dill, or leave the option out)",
                     marks=pytest.mark.skipif(importlib.util.find_spec("dill") is not None, reason="dill is installed")),
        (["--body", '{"DicomVersion": "1999"}'], None),
        # found by a review: an unset "$RUNNER" ran the DirectRunner; thousands of processes
        # forked for minutes
        (["--runner", ""], "dicom-deid: --runner is empty: give a runner (DirectRunner, DataflowRunner, ...; an unset "
         "shell variable?), or leave --runner out for the DirectRunner"),
        (["--processes", str(cli.max_processes() + 1)],
         f"dicom-deid: argument --processes: at most {cli.max_processes()} on this machine (8 per CPU, or 64) "
         "(see `dicom-deid anonymize --help`)"),
    ],
)
def test_usage_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args, expected):
    write_study(make_study(seed=5, n_ct=1, rtstruct=False, sr=False), tmp_path / "in")
    code = cli.main(["anonymize", str(tmp_path / "in"), str(tmp_path / "out"), *args])
    line = _one_line_error(capsys.readouterr().err)
    assert code == cli.EXIT_USAGE
    if expected is not None:
        assert line.startswith(expected) and (line == expected or expected.endswith("identifiers"))
    else:
        assert "DicomVersion" in line
    assert not (tmp_path / "out").exists()


def test_config_with_comments_trailing_commas_and_bom_is_read_as_orthanc_reads_it(tmp_path: Path):
    """Orthanc (JsonCpp) accepts a byte-order mark, // and /* */ comments and trailing commas;
    configs written for it run unchanged here."""
    config = tmp_path / "modify.json"
    config.write_text(
        "\ufeff// relabel one study for the teaching file\n"
        "{\n"
        '  "Replace": {\n'
        '    "StudyDescription": "relabelled", /* was the referral reason */\n'
        '    "InstitutionName": "Teaching",\n'
        "  },\n"
        '  "Remove": ["ReferringPhysicianName",],\n'
        "}\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.dcm"
    code = cli.main(["modify", str(CT), str(out), "--config", str(config), "--key-file", str(write_key(tmp_path))])
    assert code == 0
    ds = pydicom.dcmread(out)
    assert (ds.StudyDescription, ds.InstitutionName) == ("relabelled", "Teaching")
    assert "ReferringPhysicianName" not in ds and "ReferringPhysicianName" in pydicom.dcmread(CT)


def test_broken_json_far_beyond_the_lenient_size_gives_json_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """json5 is pure Python; a big body that strict JSON refuses is not handed to it."""
    padding = "A" * (cli._LENIENT_JSON_MAX_CHARS + 10)
    body = '{"Replace": {"PixelData": "data:application/octet-stream;base64,' + padding + '"},}'
    code = cli.main(["modify", str(CT), str(tmp_path / "o.dcm"), "--body", body])
    assert _one_line_error(capsys.readouterr().err) == (
        f"dicom-deid: --body: invalid JSON at line 1 column {len(body)}: Expecting property name enclosed in double quotes "
        "(comments and trailing commas are read in bodies up to 256 KiB)"
    )
    assert code == cli.EXIT_USAGE


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code = cli.main(["anonymize", str(CT), str(tmp_path / "out"), "--config", str(tmp_path / "nope.json")])
    assert _one_line_error(capsys.readouterr().err) == f"dicom-deid: --config {str(tmp_path / 'nope.json')!r}: cannot read (No such file or directory)"
    assert code == 2


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"output": "in/out"}, "OUTPUT and INPUT overlap"),
        ({"input": "in/sub", "output": "in"}, "OUTPUT and INPUT overlap"),
        ({"audit": "out/audit"}, "--audit is inside OUTPUT"),
        ({"audit": "in/audit"}, "--audit is inside INPUT"),
        ({"crosswalk": "out/cw"}, "--crosswalk is inside OUTPUT"),
        ({"crosswalk": "audit/cw", "audit": "audit"}, "--crosswalk is inside --audit"),
        ({"output": "out.dcm"}, "OUTPUT ends in .dcm (one file) but INPUT is not one local file"),
        ({"input": "missing"}, "INPUT 'IN/missing' does not exist"),
        ({"input": "in-\udcff", "dir": "in-\udcff"}, "INPUT: the path is not valid UTF-8 (rename it): pipelines carry paths as UTF-8"),
        ({"output": "a-file", "file": "a-file"}, "OUTPUT 'IN/a-file' exists and is not a folder"),
        ({"audit": "a-file", "file": "a-file"}, "--audit 'IN/a-file' exists and is not a folder"),
        ({"crosswalk": "a-file", "file": "a-file"}, "--crosswalk 'IN/a-file' exists and is not a folder"),
        ({"output": "a-file/out", "file": "a-file"}, "OUTPUT 'IN/a-file/out' cannot be created: 'IN/a-file' is a file, not a folder"),
        ({"output": "link/out", "link": "in/sub"}, "OUTPUT and INPUT overlap"),  # a symbolic link into INPUT
        # a pattern reaches under its folder before the first wildcard ("in [1]" is no folder name there)
        ({"input": "in [1]/*.dcm", "output": "out"}, "OUTPUT and INPUT overlap: INPUT is a pattern, whose files may "
         "lie anywhere under 'IN' (its folder before the first *, ? or [), and OUTPUT is there"),
        ({"input": "in/s*", "output": "in/out"}, "anywhere under 'IN/in' (its folder"),
        ({"output": "out[1]"}, "OUTPUT 'IN/out[1]': the path must not contain *, ? or [ (Beam's file sinks read them as "
         "patterns; a relative path counts from the current folder, whose own path may hold them)"),
        ({"audit": "aud*"}, "--audit 'IN/aud*': the path must not contain *, ? or ["),
        ({"output": "aud/out", "audit": "aud"}, "OUTPUT is inside --audit"),
        ({"input": "in/sub", "audit": "in"}, "INPUT is inside --audit: the audit folder must hold the audit only"),
        ({"audit": "cw/aud", "crosswalk": "cw"}, "OUTPUT, --audit or INPUT is inside --crosswalk"),
        ({"output": "cw/out", "crosswalk": "cw"}, "OUTPUT, --audit or INPUT is inside --crosswalk"),
    ],
)
def test_locations_are_checked_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str], layout, message):
    write_study(make_study(seed=5, n_ct=1, rtstruct=False, sr=False), tmp_path / "in" / "sub")
    if "link" in layout:
        (tmp_path / "link").symlink_to(tmp_path / layout["link"], target_is_directory=True)
    if "dir" in layout:
        write_study(make_study(seed=5, n_ct=1, rtstruct=False, sr=False), tmp_path / layout["dir"])
    if "file" in layout:
        (tmp_path / layout["file"]).write_text("a file where a folder is expected\n")
    argv = ["anonymize", str(tmp_path / layout.get("input", "in")), str(tmp_path / layout.get("output", "out"))]
    if "audit" in layout:
        argv += ["--audit", str(tmp_path / layout["audit"])]
    if "crosswalk" in layout:
        argv += ["--crosswalk", str(tmp_path / layout["crosswalk"])]
    code = cli.main(argv)
    line = _one_line_error(capsys.readouterr().err)
    assert message.replace("IN/", f"{tmp_path}/").replace("'IN'", repr(str(tmp_path))) in line
    assert code == cli.EXIT_USAGE
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["anonymize", "IN", ""], "OUTPUT is empty: give a path (an unset shell variable?)"),
        (["anonymize", "", "OUT"], "INPUT is empty: give a path (an unset shell variable?)"),
        (["anonymize", "IN", "OUT", "--crosswalk", ""], "--crosswalk is empty: give a path (an unset shell variable?)"),
        (["anonymize", "IN", "OUT", "--audit", " "], "--audit is empty: give a path (an unset shell variable?)"),
        (["modify", "IN", "OUT", "--key-file", ""], "--key-file is empty: give a path (an unset shell variable?)"),
        (["split", "IN", "", "--study", "1.2.3", "--body", "{}"], "OUTPUT is empty: give a path (an unset shell variable?)"),
        # "gs://$BUCKET", "file://$OUT" with the variable unset: "gs:" would be a local folder
        # in the current one (a crosswalk of original identifiers there), "file://" the
        # current folder itself.
        (["anonymize", "IN", "OUT", "--crosswalk", "gs://"],
         "--crosswalk 'gs://' names no bucket: give one after gs:// (an unset shell variable?)"),
        (["anonymize", "IN", "gs:///deid"],
         "OUTPUT 'gs:///deid' names no bucket: give one after gs:// (an unset shell variable?)"),
        (["anonymize", "IN", "OUT", "--audit", "gs:// "],
         "--audit 'gs:// ' names no bucket: give one after gs:// (an unset shell variable?)"),
        (["anonymize", "gs://", "OUT"], "INPUT 'gs://' names no bucket: give one after gs:// (an unset shell variable?)"),
        (["anonymize", "IN", "file://"], "OUTPUT 'file://' names no path: give one after file:// (an unset shell variable?)"),
        (["modify", "IN", "OUT", "--key-file", "file://"],
         "--key-file 'file://' names no path: give one after file:// (an unset shell variable?)"),
        (["merge", "IN", "gs://", "--study", "1.2.3", "--body", "{}"],
         "OUTPUT 'gs://' names no bucket: give one after gs:// (an unset shell variable?)"),
        # one slash: a local folder "gs:" in the current one, even for a one-file OUTPUT
        (["anonymize", "IN", "gs:/bucket/out"],
         "OUTPUT 'gs:/bucket/out': one slash after gs: (give gs:// for a location there, or "
         "./gs:/bucket/out for a local path)"),
        (["anonymize", "IN/0.dcm", "gs:/bucket/out.dcm"], "OUTPUT 'gs:/bucket/out.dcm': one slash after gs:"),
        (["anonymize", "IN", "OUT", "--crosswalk", "gs:/b/cw"], "--crosswalk 'gs:/b/cw': one slash after gs:"),
        (["modify", "IN", "OUT", "--key-file", "gs:/secrets/k"], "--key-file 'gs:/secrets/k': one slash after gs:"),
        (["split", "file:/in", "OUT", "--study", "1.2.3", "--body", "{}"], "INPUT 'file:/in': one slash after file:"),
    ],
)
def test_an_empty_path_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch, argv, message):
    """An unset "$OUT" in a script: taken as the current folder, the run would write into (or
    de-identify) wherever the command runs; refused before anything happens."""
    write_study(make_study(seed=5, n_ct=1, rtstruct=False, sr=False), tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    argv = [{"IN": str(tmp_path / "in"), "OUT": str(tmp_path / "out")}.get(a, a) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(argv) == cli.EXIT_USAGE
    assert _one_line_error(capsys.readouterr().err).startswith(f"dicom-deid: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_folders_of_an_earlier_run_keep_their_own_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Checked within one run, the locations could still be mixed across runs: a crosswalk
    (original identifiers) written into an earlier run's release, an audit among its DICOM
    files, DICOM files into an earlier audit folder, an audit into an earlier crosswalk folder.
    Each is refused before anything is written; a rerun into the same folders is not."""
    write_study(make_study(seed=5, n_ct=1, rtstruct=False, sr=False), tmp_path / "in")
    key = ["--key-file", str(write_key(tmp_path)), "--quiet"]
    rel1 = tmp_path / "rel1"
    assert cli.main(["anonymize", str(tmp_path / "in"), str(rel1), "--crosswalk", str(tmp_path / "cw"), *key]) == 0
    cases = [
        ([str(tmp_path / "rel2"), "--crosswalk", str(rel1)],
         f"--crosswalk {str(rel1)!r} already holds de-identified DICOM files of an earlier run: give --crosswalk a "
         "folder of its own (keep original identifiers apart)"),
        ([str(tmp_path / "rel3"), "--audit", str(rel1)],
         f"--audit {str(rel1)!r} already holds de-identified DICOM files of an earlier run: give --audit a folder of "
         "its own"),
        ([str(tmp_path / "rel1-audit")],
         f"OUTPUT {str(tmp_path / 'rel1-audit')!r} already holds an audit of an earlier run: give OUTPUT a folder of "
         "its own"),
        ([str(tmp_path / "rel4"), "--audit", str(tmp_path / "cw")],
         f"--audit {str(tmp_path / 'cw')!r} already holds a crosswalk of an earlier run: give --audit a folder of its "
         "own (keep original identifiers apart)"),
    ]  # fmt: skip
    for args, message in cases:
        assert cli.main(["anonymize", str(tmp_path / "in"), *args, *key]) == cli.EXIT_USAGE
        assert _one_line_error(capsys.readouterr().err) == f"dicom-deid: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cw", "deid.key", "in", "rel1", "rel1-audit"]
    # One-file mode too (it skipped these checks: found by a review): its OUTPUT's folder,
    # --audit and --crosswalk keep their kinds.
    one = sorted((tmp_path / "in").rglob("*.dcm"))[0]
    single = [
        ([str(tmp_path / "single" / "one.dcm"), "--crosswalk", str(rel1)], cases[0][1]),
        ([str(tmp_path / "rel1-audit" / "x.dcm")], cases[2][1]),
        ([str(tmp_path / "one.dcm"), "--audit", str(tmp_path / "cw")], cases[3][1]),
    ]
    for args, message in single:
        assert cli.main(["anonymize", str(one), *args, *key]) == cli.EXIT_USAGE
        assert _one_line_error(capsys.readouterr().err) == f"dicom-deid: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cw", "deid.key", "in", "rel1", "rel1-audit"]
    assert not list((tmp_path / "rel1-audit").glob("*.dcm"))
    # the same run again, into the same three folders
    assert cli.main(["anonymize", str(tmp_path / "in"), str(rel1), "--crosswalk", str(tmp_path / "cw"), *key]) == 0


def test_output_under_another_name_of_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """INPUT given by a bind mount's name (``docker run -v /data:/in``) and OUTPUT by the host's
    (``/data/deid``): no path string says that OUTPUT is inside INPUT, and the run would read
    its own outputs as inputs. OUTPUT's existing ancestors are compared by device and inode.
    (Two bind mounts, ``-v /data:/in -v /data/deid:/out``, hide it from any path: README.)"""
    data = tmp_path / "data"
    write_study(make_study(seed=5, n_ct=1, rtstruct=False, sr=False), data)
    (tmp_path / "in").mkdir()
    done = subprocess.run(["mount", "--bind", str(data), str(tmp_path / "in")], capture_output=True, check=False)
    if done.returncode:
        pytest.skip("bind mounts need root (mount --bind failed)")
    try:
        assert cli.main(["anonymize", str(tmp_path / "in"), str(data / "deid"), "--audit", str(tmp_path / "audit"),
                         "--key-file", str(write_key(tmp_path))]) == cli.EXIT_USAGE  # fmt: skip
        assert _one_line_error(capsys.readouterr().err) == (
            "dicom-deid: OUTPUT and INPUT overlap: choose an OUTPUT outside INPUT (and not containing it)")
        assert not (data / "deid").exists() and not (tmp_path / "audit").exists()
    finally:
        subprocess.run(["umount", str(tmp_path / "in")], check=False)


def test_an_output_name_ending_in_a_separator_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """``new.dcm/`` names a folder: one input file is written into it, as a pipeline output;
    an existing folder named ``x.dcm`` is a valid OUTPUT for a folder INPUT."""
    key = ["--key-file", str(write_key(tmp_path)), "--quiet"]
    assert cli.main(["anonymize", str(CT), str(tmp_path / "new.dcm") + "/", *key]) == 0
    assert (tmp_path / "new.dcm").is_dir()
    (written,) = (tmp_path / "new.dcm").rglob("*.dcm")
    assert pydicom.dcmread(written).PatientIdentityRemoved == "YES"
    write_study(make_study(seed=5, n_ct=1, rtstruct=False, sr=False), tmp_path / "in")
    (tmp_path / "dir.dcm").mkdir()
    assert cli.main(["anonymize", str(tmp_path / "in"), str(tmp_path / "dir.dcm") + "/", *key]) == 0
    assert len(list((tmp_path / "dir.dcm").rglob("*.dcm"))) == len(list((tmp_path / "in").rglob("*.dcm")))
    # one file into an existing folder named like a file, without the separator: refused
    assert cli.main(["anonymize", str(CT), str(tmp_path / "new.dcm"), *key]) == cli.EXIT_USAGE
    assert _one_line_error(capsys.readouterr().err) == (
        f"dicom-deid: OUTPUT {str(tmp_path / 'new.dcm')!r} is an existing folder: end it with / to write into it, "
        "or name a file")


def test_one_tag_named_twice_in_replace_is_noted(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """``PatientName`` and ``0010,0010`` in one Replace: Orthanc visits the names in sorted
    order and keeps the last value; so do we (bodies are accepted verbatim), with a note that
    names both spellings (never the values)."""
    out = tmp_path / "o.dcm"
    body = {"Replace": {"PatientName": "A^SECRET", "0010,0010": "B^SECRET"}}
    assert cli.main(["modify", str(CT), str(out), "--body", json.dumps(body), "--key-file", str(write_key(tmp_path))]) == 0
    assert capsys.readouterr().err == (
        "dicom-deid: note: Replace names 'PatientName' (0010,0010) twice ('0010,0010' and 'PatientName'): the value "
        "of 'PatientName', the later in name order, is used, as in Orthanc\n")
    assert pydicom.dcmread(out).PatientName == "A^SECRET"
    plan = request.parse_modify({"Replace": {"PatientName": "A"}})
    assert plan.notes == () and request.parse_modify(body).notes != ()


def test_an_existing_folder_is_taken_literally_whatever_its_name(tmp_path: Path):
    """``scan[1]`` names that folder, not a pattern that would match a sibling ``scan1``."""
    folder = tmp_path / "scan[1]"
    write_study(make_study(seed=8, n_ct=1, rtstruct=False, sr=False), folder)
    (tmp_path / "scan1").write_bytes(CT.read_bytes())
    assert cli.main(["anonymize", str(folder), str(tmp_path / "out"), "--key-file", str(write_key(tmp_path)), "--quiet"]) == 0
    assert [Path(r["source_uri"]).parent for r in read_rows(tmp_path / "out-audit")] == [folder]
    one = tmp_path / "br[a].dcm"  # one file, OUTPUT a folder
    one.write_bytes(CT.read_bytes())
    assert cli.main(["anonymize", str(one), str(tmp_path / "out2"), "--key-file", str(write_key(tmp_path)), "--quiet"]) == 0
    assert [r["source_uri"] for r in read_rows(tmp_path / "out2-audit")] == [str(one)]


def test_single_file_locations_are_checked_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    source = tmp_path / "a.dcm"
    source.write_bytes(CT.read_bytes())
    key = ["--key-file", str(write_key(tmp_path))]
    cases = [
        ([str(source), str(source)], "OUTPUT is the INPUT file: dicom-deid never overwrites its inputs"),
        ([str(source), str(tmp_path / "b.dcm"), "--audit", str(tmp_path / "x"), "--crosswalk", str(tmp_path / "x")],
         "--crosswalk is inside --audit (or the reverse): keep original identifiers apart from the audit"),
        ([str(source), str(tmp_path / "b.dcm"), "--audit", str(source)], f"--audit {str(source)!r} exists and is not a folder"),
        ([str(source), str(tmp_path / "x" / "b.dcm"), "--audit", str(tmp_path)],
         "--audit holds the INPUT or OUTPUT file: the audit folder must hold the audit only (a folder run over it "
         "would read the audit as input)"),
        ([str(source), str(tmp_path / "x" / "b.dcm"), "--audit", str(tmp_path / "x")],
         "--audit holds the INPUT or OUTPUT file: the audit folder must hold the audit only"),
        # original identifiers beside the de-identified file, in a folder without the input
        ([str(source), str(tmp_path / "x" / "b.dcm"), "--crosswalk", str(tmp_path / "x" / "cw")],
         f"--crosswalk is inside OUTPUT's folder {str(tmp_path / 'x')!r}: original identifiers must never sit "
         "with de-identified files (give the crosswalk a folder outside it)"),
        # refused, not a write_error row after the work (exit 3)
        ([str(source), str(source / "b.dcm")], f"OUTPUT's folder {str(source)!r} exists and is not a folder"),
        ([str(tmp_path / "a-typo.dcm"), str(tmp_path / "b.dcm")], f"INPUT {str(tmp_path / 'a-typo.dcm')!r} does not exist"),
    ]
    for args, message in cases:
        assert cli.main(["anonymize", *args, *key]) == cli.EXIT_USAGE
        assert _one_line_error(capsys.readouterr().err).startswith(f"dicom-deid: {message}")
        assert source.read_bytes() == CT.read_bytes()
        assert not (tmp_path / "b.dcm").exists() and not (tmp_path / "x").exists()
    # --crosswalk without --audit is written, not ignored
    assert cli.main(["anonymize", str(source), str(tmp_path / "b.dcm"), "--crosswalk", str(tmp_path / "cw"), *key]) == 0
    (table,) = (tmp_path / "cw").glob("crosswalk-*.parquet")
    import pyarrow.parquet as pq

    assert pq.read_table(table).column("original_sop_instance_uid").to_pylist() == [pydicom.dcmread(CT).SOPInstanceUID]


def test_a_reader_that_stops_early_does_not_turn_a_run_into_a_storage_error(tmp_path: Path):
    """`dicom-deid anonymize ... | head -1`: the summary's print met a closed pipe, and the
    BrokenPipeError reached the storage-error branch (exit 1, "the audit may be incomplete")
    although every file, the audit and summary.json were complete."""
    folder = tmp_path / "in"
    write_study(make_study(seed=5, n_ct=1, rtstruct=False, sr=False), folder)
    argv = [sys.executable, "-m", "pipelines.cli", "anonymize", str(folder), str(tmp_path / "out"),
            "--key-file", str(write_key(tmp_path)), "--runner", "DirectRunner"]
    root = Path(__file__).resolve().parents[1]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root) as proc:
        proc.stdout.close()  # no reader: the first write gets EPIPE
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=300)
    assert (code, err) == (0, "")
    assert json.loads((tmp_path / "out-audit" / "summary.json").read_text())["Statuses"]["written"] == 1


@pytest.mark.parametrize("command", ["anonymize", "split"])
def test_input_matching_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str):
    """Refused before anything is written: an earlier run's summary.json stays as it was."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "out-audit").mkdir()
    (tmp_path / "out-audit" / "summary.json").write_text('{"InputFiles": 1}')
    extra = ["--study", "1.2.3", "--body", '{"Series": ["1.2.3.4"]}'] if command == "split" else []
    code = cli.main([command, str(tmp_path / "empty"), str(tmp_path / "out"), "--key-file", str(write_key(tmp_path)),
                     *extra])
    assert _one_line_error(capsys.readouterr().err) == f"dicom-deid: INPUT {str(tmp_path / 'empty')!r} matched no files"
    assert code == cli.EXIT_USAGE
    assert [p.name for p in (tmp_path / "out-audit").iterdir()] == ["summary.json"]
    assert (tmp_path / "out-audit" / "summary.json").read_text() == '{"InputFiles": 1}'
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- keys


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    write_study(make_study(seed=6, n_ct=2, rtstruct=False, sr=False), folder)
    return folder


def test_key_from_env_is_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv(ENV_VAR, SECRET.decode())
    folder = _folder(tmp_path)
    assert cli.main(["anonymize", str(folder), str(tmp_path / "a")]) == 0
    first = capsys.readouterr()
    summary = json.loads(first.out)
    assert (summary["KeyId"], summary["Reproducible"]) == (Key.from_env().key_id, True)
    assert "Warning" not in summary
    assert first.err == ""
    # the same key from a file gives the same files
    assert cli.main(["anonymize", str(folder), str(tmp_path / "b"), "--key-file", str(write_key(tmp_path)), "--quiet"]) == 0
    rel = lambda root: sorted(p.relative_to(root) for p in root.rglob("*.dcm"))  # noqa: E731
    assert rel(tmp_path / "a") == rel(tmp_path / "b")
    assert Key.from_env().key_id == KEY.key_id


def test_random_key_is_announced_and_not_reproducible(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    folder = _folder(tmp_path)
    assert cli.main(["anonymize", str(folder), str(tmp_path / "a")]) == 0
    first = capsys.readouterr()
    summary = json.loads(first.out)
    assert summary["Reproducible"] is False
    assert "cannot be reproduced" in summary["Warning"]
    assert first.err == f"dicom-deid: warning: no --key-file and no DICOM_DEID_KEY: random key {summary['KeyId']}, pseudonyms cannot be reproduced\n"
    assert cli.main(["anonymize", str(folder), str(tmp_path / "b"), "--quiet"]) == 0
    names = lambda root: {p.name for p in root.rglob("*.dcm")}  # noqa: E731
    assert len(names(tmp_path / "a")) == 2
    assert names(tmp_path / "a").isdisjoint(names(tmp_path / "b"))


def test_another_key_into_the_same_output_is_warned_at_the_start_and_the_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """The README's order (a trial with a random key, then the key file) into one OUTPUT puts two
    sets of pseudonyms side by side: the second run says so. The same key again does not."""
    folder, out = _folder(tmp_path), tmp_path / "out"
    assert cli.main(["anonymize", str(folder), str(out), "--quiet"]) == 0
    trial = json.loads((tmp_path / "out-audit" / "summary.json").read_text())
    capsys.readouterr()
    args = ["anonymize", str(folder), str(out), "--key-file", str(write_key(tmp_path)), "--quiet"]
    assert cli.main(args) == 0
    warning = (f"dicom-deid: warning: OUTPUT already holds 2 files that run {trial['RunId']} wrote with key "
               f"{trial['KeyId']}; this run's key is {KEY.key_id}, so its pseudonyms and UIDs differ and both "
               "sets will sit side by side in OUTPUT (give each key its own OUTPUT)\n")
    assert capsys.readouterr().err == warning * 2
    assert len(list(out.rglob("*.dcm"))) == 4
    assert cli.main(args) == 0  # an incremental batch with the same key: one set
    assert capsys.readouterr().err == ""
    assert len(list(out.rglob("*.dcm"))) == 4
    ds = pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True)
    split = ["split", str(folder), str(tmp_path / "split"), "--study", str(ds.StudyInstanceUID), "--quiet",
             "--body", json.dumps({"Series": [str(ds.SeriesInstanceUID)]})]
    assert cli.main([*split, "--key-file", str(tmp_path / "deid.key")]) == 0  # (a split's OUTPUT: no release)
    last = json.loads((tmp_path / "split-audit" / "summary.json").read_text())["RunId"]
    capsys.readouterr()
    assert cli.main(split) == 0  # a random key: split and merge warn alike
    err = capsys.readouterr().err.splitlines()
    assert err[1] == err[2] == (f"dicom-deid: warning: OUTPUT already holds 2 files that run {last} wrote with key "
                                f"{KEY.key_id}; this run's key is {err[0].split('random key ')[1].split(',')[0]}, so its "
                                "pseudonyms and UIDs differ and both sets will sit side by side in OUTPUT (give each "
                                "key its own OUTPUT)")


def test_key_is_never_printed_or_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    folder = _folder(tmp_path)
    (folder / "junk.bin").write_bytes(b"junk")
    key = write_key(tmp_path)
    code = cli.main(["anonymize", str(folder), str(tmp_path / "out"), "--key-file", str(key), "--crosswalk", str(tmp_path / "cw")])
    captured = capsys.readouterr()
    assert code == cli.EXIT_SOME_FAILED
    for blob in (captured.out.encode(), captured.err.encode(), all_bytes_under(tmp_path / "out"), all_bytes_under(tmp_path / "out-audit"), all_bytes_under(tmp_path / "cw")):
        assert SECRET not in blob
        assert SECRET.hex().encode() not in blob


def test_short_key_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    key = tmp_path / "short.key"
    key.write_bytes(b"short")
    code = cli.main(["anonymize", str(CT), str(tmp_path / "o.dcm"), "--key-file", str(key)])
    line = _one_line_error(capsys.readouterr().err)
    assert "at least 16" in line and "short" not in line.split(":", 2)[-1].replace("short.key", "")
    assert code == cli.EXIT_USAGE


# --------------------------------------------------------------------------- summary, exit status, progress


def test_summary_on_stdout_and_exit_3_names_reasons(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    folder = _folder(tmp_path)
    (folder / "empty.dcm").write_bytes(b"")
    code = cli.main(["anonymize", str(folder), str(tmp_path / "out"), "--key-file", str(write_key(tmp_path))])
    captured = capsys.readouterr()
    assert code == cli.EXIT_SOME_FAILED
    summary = json.loads(captured.out)
    assert json.loads((tmp_path / "out-audit" / "summary.json").read_text()) == summary
    assert (summary["InstancesCount"], summary["FailedInstancesCount"], summary["Reasons"]) == (3, 1, {"empty": 1})
    assert captured.err == f"dicom-deid: 1 of 3 input files failed (empty 1); see {tmp_path / 'out-audit'}\n"


def test_progress_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    folder = _folder(tmp_path)
    (folder / "x.txt").write_text("x")
    code = cli.main(["anonymize", str(folder), str(tmp_path / "out"), "--key-file", str(write_key(tmp_path)), "--quiet", "--progress"])
    err = capsys.readouterr().err
    assert code == 3
    progress, failure = err.split("\r")[-1].split("\n", 1)
    assert progress.startswith("3 files: 2 written, 1 failed, 0 skipped, ")
    assert progress.rstrip().endswith(" files/s")
    assert failure.startswith("dicom-deid: 1 of 3 input files failed (not_dicom 1)")


def test_console_script_end_to_end(tmp_path: Path):
    """The installed entry point, in its own process."""
    exe = Path(sys.executable).with_name("dicom-deid")
    folder = _folder(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}

    def anonymize(out: str) -> subprocess.CompletedProcess:
        argv = [str(exe), "anonymize", str(folder), str(tmp_path / out), "--key-file", str(write_key(tmp_path))]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)

    done = anonymize("out")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert json.loads(done.stdout)["Statuses"] == {"written": 2, "failed": 0, "skipped": 0}
    # The command ends without the interpreter's teardown (cli.entry): its status and its
    # standard output must still be whole when some files fail.
    (folder / "junk.txt").write_bytes(b"not DICOM")
    failed = anonymize("out2")
    assert failed.returncode == cli.EXIT_SOME_FAILED, failed.stderr
    assert json.loads(failed.stdout)["Statuses"] == {"written": 2, "failed": 1, "skipped": 0}
    assert failed.stderr.startswith("dicom-deid: 1 of 3 input files failed (not_dicom 1)")
    helped = subprocess.run([str(exe), "modify", "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0
    for option in ("--body", "--config", "--level", "--key-file", "--audit", "--crosswalk", "--max-bytes"):
        assert option in helped.stdout


def test_version_names_the_release_and_its_libraries(capsys: pytest.CaptureFixture[str]):
    from importlib import metadata

    import pyarrow
    import pydicom

    from transforms import __version__

    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert __version__ == metadata.version("dicom-deid")  # pyproject.toml and the code agree
    assert capsys.readouterr().out == (
        f"dicom-deid {__version__} (pydicom {pydicom.__version__}, "
        f"apache-beam {metadata.version('apache-beam')}, pyarrow {pyarrow.__version__})\n"
    )


def test_terminal_gets_counts_not_every_resource(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "in"
    write_study(make_study(seed=8, n_ct=12), folder)  # 14 instances, 3 series, 1 study, 1 patient
    write_study(make_study(seed=9, n_ct=12, patient_id="PID-2"), folder / "b")
    write_study(make_study(seed=10, n_ct=1, rtstruct=False, sr=False), folder / "c")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code = cli.main(["anonymize", str(folder), str(tmp_path / "out"), "--key-file", str(write_key(tmp_path)), "--no-progress"])
    shown = json.loads(capsys.readouterr().out)
    stored = json.loads((tmp_path / "out-audit" / "summary.json").read_text())
    assert code == 0
    assert len(stored["Resources"]) == 29 + 7 + 3 + 2  # the third study shares patient 1
    assert shown["Resources"] == f"41 entries, see {tmp_path / 'out-audit'}/summary.json"
    assert {k: v for k, v in shown.items() if k != "Resources"} == {k: v for k, v in stored.items() if k != "Resources"}


@pytest.mark.parametrize(("argv", "verbose", "local", "level"), [
    (["--runner=DirectRunner"], False, True, "CRITICAL"),
    (["--direct_running_mode=multi_processing"], False, True, "CRITICAL"),  # default runner: the DirectRunner
    (["--runner=DirectRunner"], True, True, "INFO"),
    (["--runner=DirectRunner", "--default_sdk_harness_log_level=DEBUG"], False, True, "DEBUG"),
    (["--runner=DataflowRunner"], False, False, "INFO"),
])  # fmt: skip
def test_local_workers_log_errors_only_unless_asked(argv: list[str], verbose: bool, local: bool, level: str):
    """anonymize/modify and split/merge share this: multi_processing workers write to our
    terminal, so they are told to log only what ends them (an error's text may quote data),
    unless --verbose or an explicit level."""
    import signal

    from apache_beam.options.pipeline_options import WorkerOptions

    from pipelines import run as pipeline_run

    options = pipeline_run.pipeline_options(argv)
    previous = signal.getsignal(signal.SIGINT)
    try:
        assert cli.quiet_local_workers(options, verbose=verbose, beam_args=argv) is local
    finally:  # multi_processing also arms the signal handling main() undoes at its end
        signal.signal(signal.SIGINT, previous)
        cli._STOP_CHILDREN = False
    assert (options.view_as(WorkerOptions).default_sdk_harness_log_level or "INFO") == level


def test_one_file_mode_and_help_never_import_beam(tmp_path: Path):
    """Beam takes ~0.75 s to import: the one-file command (with its audit and crosswalk), a
    refused body and --help run without it."""
    probe = (
        "import sys, contextlib, io\n"
        "from pipelines import cli\n"
        "ct, out, key = sys.argv[1:4]\n"
        "codes = [cli.main(['anonymize', ct, out + '/rel/a.dcm', '--key-file', key, '--quiet', '--audit', out + '/audit',\n"
        "                   '--crosswalk', out + '/cw'])]\n"
        "codes.append(cli.main(['modify', ct, out + '/b.dcm', '--body', '{\"Replace\": {\"Rows\": \"abc\"}}']))\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        cli.main(['split', '--help'])\n"
        "    except SystemExit as done:\n"
        "        codes.append(done.code)\n"
        "print(codes, 'apache_beam' in sys.modules)\n"
    )
    ct = get_testdata_file("CT_small.dcm", read=False)
    done = subprocess.run(
        [sys.executable, "-c", probe, ct, str(tmp_path), str(write_key(tmp_path))],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "[0, 2, 0] False"
    assert pydicom.dcmread(tmp_path / "rel" / "a.dcm").PatientIdentityRemoved == "YES"
    assert sorted(p.name for p in (tmp_path / "audit").iterdir() if p.name.startswith("summary")) == [
        "summary-" + json.loads((tmp_path / "audit" / "summary.json").read_text())["RunId"] + ".json",
        "summary.json",
    ]
    assert len(list((tmp_path / "cw").glob("crosswalk-*.parquet"))) == 1


def test_ctrl_c_inside_a_bundle_is_reported_as_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]):
    """Beam re-raises a KeyboardInterrupt from a bundle wrapped in a RuntimeError (after logging
    it with a traceback): the command says "interrupted" and exits 130, without the traceback."""
    import logging

    def interrupted_run(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            logging.getLogger("apache_beam.runners.common").error("KeyboardInterrupt [while running 'X']", exc_info=True)
            raise RuntimeError("KeyboardInterrupt [while running 'DeidentifyInstances/Deidentify']") from exc

    monkeypatch.setattr("pipelines.run.run_and_wait", interrupted_run)
    folder = tmp_path / "in"
    write_study(make_study(seed=9, n_ct=1, rtstruct=False, sr=False), folder)
    code = cli.main(["anonymize", str(folder), str(tmp_path / "out"), "--key-file", str(write_key(tmp_path)), "--quiet"])
    assert code == cli.EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "dicom-deid: interrupted\n"


def test_key_file_size_is_bounded_and_file_uris_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    big = tmp_path / "big.key"
    big.write_bytes(b"k" * ((1 << 20) + 1))
    assert cli.main(["anonymize", str(CT), str(tmp_path / "a.dcm"), "--key-file", str(big)]) == cli.EXIT_USAGE
    assert _one_line_error(capsys.readouterr().err) == f"dicom-deid: --key-file {str(big)!r}: larger than 1 MiB: not a key file"
    assert not (tmp_path / "a.dcm").exists()
    key = write_key(tmp_path)
    assert cli.main(["anonymize", str(CT), str(tmp_path / "b.dcm"), "--key-file", f"file://{key}"]) == 0
    assert cli.main(["anonymize", str(CT), str(tmp_path / "c.dcm"), "--key-file", str(key)]) == 0
    assert (tmp_path / "b.dcm").read_bytes() == (tmp_path / "c.dcm").read_bytes()


@pytest.mark.parametrize("replace", [{"StudyInstanceUID": "abc"}, {"SeriesInstanceUID": None}, {"SOPInstanceUID": "1.2\\1.3"}])
def test_one_file_mode_writes_uids_the_request_forces(tmp_path: Path, replace: dict):
    """Orthanc's instance route writes these; in one-file mode no UID names a folder, so they
    are the request's business (they used to fail as invalid_uid, exit 3)."""
    out = tmp_path / "u.dcm"
    body = json.dumps({"Replace": replace, "Force": True})
    assert cli.main(["modify", str(CT), str(out), "--body", body, "--key-file", str(write_key(tmp_path))]) == 0
    ds = pydicom.dcmread(out)
    (keyword, value), = replace.items()
    assert ds[keyword].value == (value.split("\\") if value and "\\" in value else (value or ""))


@pytest.mark.parametrize("key_source", ["file", "env", "random"])
def test_remote_runner_refuses_a_key_that_would_travel_in_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], key_source: str
):
    """On Dataflow the job description (every DoFn's configuration) is stored by the service:
    only a key file the workers read themselves (gs://) may be used there."""
    folder = tmp_path / "in"
    write_study(make_study(seed=11, n_ct=1, rtstruct=False, sr=False), folder)
    monkeypatch.delenv(ENV_VAR, raising=False)
    key_args = []
    if key_source == "file":
        key_args = ["--key-file", str(write_key(tmp_path))]
    elif key_source == "env":
        monkeypatch.setenv(ENV_VAR, SECRET.decode())
    argv = ["anonymize", str(folder), str(tmp_path / "out"), *key_args, "--runner", "DataflowRunner",
            "--project", "deid-test-project", "--region", "europe-west1", "--temp_location", "gs://deid-temp/tmp"]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        "dicom-deid: --runner DataflowRunner runs on other machines: give the key as --key-file gs://... "
        "(a file the workers can read); a key from a local file, DICOM_DEID_KEY or a random key would be "
        "written into the job description\n"
    )
    assert SECRET.decode() not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-audit").exists()


@pytest.mark.parametrize("option", ["--audit", "--crosswalk", "OUTPUT"])
def test_a_location_that_cannot_be_written_is_refused_before_any_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], option: str
):
    """An audit folder without write permission used to be found only after every file was
    de-identified and written: the run then ended without its rows. (Root ignores permissions,
    so the refusal is simulated.)"""
    folder = tmp_path / "in"
    write_study(make_study(seed=12, n_ct=1, rtstruct=False, sr=False), folder)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if os.fspath(path) == str(locked)
                        else real_access(path, mode, **kw))
    target = str(locked / "sub")
    output = target if option == "OUTPUT" else str(tmp_path / "out")
    extra = [] if option == "OUTPUT" else [option, target]
    code = cli.main(["anonymize", str(folder), output, "--key-file", str(write_key(tmp_path)), *extra])
    assert code == 2
    name = "OUTPUT" if option == "OUTPUT" else option
    assert capsys.readouterr().err == f"dicom-deid: {name} {target!r}: no permission to create it in {str(locked)!r}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deid.key", "in", "locked"]
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("option", ["--audit", "--crosswalk", "OUTPUT"])
def test_a_location_the_filesystem_refuses_is_refused_before_any_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], option: str
):
    """Found by a review: the check asked access() only, which lets root through where the
    filesystem itself refuses (/sys, /proc, a read-only mount): every file was written, then
    the audit failed (exit 1, no rows). A folder made and removed at once asks the filesystem
    (the refusal is simulated: CI may run as root or not)."""
    import errno
    import tempfile

    folder = tmp_path / "in"
    write_study(make_study(seed=12, n_ct=1, rtstruct=False, sr=False), folder)
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kw):
        if dir is not None and os.fspath(dir) == str(frozen):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkdtemp(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    target = str(frozen / "sub")
    output = target if option == "OUTPUT" else str(tmp_path / "out")
    extra = [] if option == "OUTPUT" else [option, target]
    code = cli.main(["anonymize", str(folder), output, "--key-file", str(write_key(tmp_path)), *extra])
    assert code == 2
    assert capsys.readouterr().err == \
        f"dicom-deid: {option} {target!r}: cannot create it in {str(frozen)!r} (Read-only file system)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deid.key", "frozen", "in"]
    assert list(frozen.iterdir()) == []
    # and a folder that can be written gets no probe left behind
    monkeypatch.undo()
    assert cli.main(["anonymize", str(folder), str(tmp_path / "out"), "--key-file", str(tmp_path / "deid.key"),
                     "--audit", str(frozen)]) == 0
    assert not [p for p in frozen.iterdir() if "probe" in p.name]


def test_one_file_mode_refuses_a_name_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """As folder runs do: the audit carries paths as UTF-8 text, so such a name used to end the
    run with an internal error after the output was written, and without its audit row."""
    name = os.path.join(os.fsencode(tmp_path), b"M\xfcller.dcm")
    try:
        with open(name, "wb") as f:
            f.write(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    except OSError:
        pytest.skip("this filesystem refuses file names that are not UTF-8")
    out = tmp_path / "out.dcm"
    code = cli.main(["anonymize", os.fsdecode(name), str(out), "--key-file", str(write_key(tmp_path)),
                     "--audit", str(tmp_path / "audit")])
    assert code == 2
    assert capsys.readouterr().err == ("dicom-deid: INPUT: the path is not valid UTF-8 (rename it): pipelines carry "
                                       "paths as UTF-8\n")
    assert not out.exists() and not (tmp_path / "audit").exists()


@pytest.mark.parametrize("command", ["anonymize", "split"])
def test_a_run_removes_what_killed_runs_left(tmp_path: Path, command: str, monkeypatch: pytest.MonkeyPatch):
    """kill -9 leaves OUTPUT/.dicom-deid-tmp/<run>/ behind (partial files), Beam's temporary
    audit shards in the audit folder (a reader of the folder would count their rows twice) and,
    for split/merge, the study index in the system's temporary folder (original identifiers).
    The next run removes them; a run still alive (its locks held) keeps its folders."""
    import fcntl
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system-tmp"))
    (tmp_path / "system-tmp").mkdir()
    folder = tmp_path / "in"
    study = make_study(seed=13, n_ct=2, rtstruct=False, sr=False)
    write_study(study, folder)
    tmp_root = tmp_path / "out" / ".dicom-deid-tmp"
    audit = tmp_path / "out-audit"
    dead, alive = tmp_root / "20260101T000000Z-dead0000", tmp_root / "20260101T000000Z-live0000"
    locks = []
    for run in (dead, alive):
        run.mkdir(parents=True)
        (run / "index-00000-of-00001.jsonl").write_text('{"PatientID": "ORIGINAL-ID"}\n')
        (tmp_root / (run.name + ".lock")).write_text(f"sink {audit}\n")
        shard = audit / f"beam-temp-audit-{run.name}-0123abcd"
        shard.mkdir(parents=True)
        (shard / f"x.audit-{run.name}.parquet").write_bytes(b"PAR1")
        work = tmp_path / "system-tmp" / f"dicom-deid-{run.name}-abcd"
        work.mkdir()
        (work / "index-00000-of-00001.jsonl").write_text('{"PatientID": "ORIGINAL-ID"}\n')
        (work / ".lock").touch()
        if run is alive:
            locks += [tmp_root / (run.name + ".lock"), work / ".lock"]
    holder = subprocess.Popen(  # another live run: holds its locks until told to stop
        [sys.executable, "-c", "import fcntl, os, sys\nfor path in sys.argv[1:]:\n"
         "    fcntl.flock(os.open(path, os.O_RDWR), fcntl.LOCK_EX)\nprint('locked', flush=True); sys.stdin.read()",
         *map(str, locks)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        extra = []
        if command == "split":
            ds = pydicom.dcmread(sorted(folder.rglob("*.dcm"))[0])
            extra = ["--study", str(ds.StudyInstanceUID), "--body", json.dumps({"Series": [str(ds.SeriesInstanceUID)]})]
        code = cli.main([command, str(folder), str(tmp_path / "out"), "--key-file", str(write_key(tmp_path)),
                         "--quiet", *extra])
        assert code == 0
        assert sorted(p.name for p in tmp_root.iterdir()) == [alive.name, alive.name + ".lock"]
        assert sorted(p.name for p in audit.iterdir() if p.name.startswith("beam-temp")) == [
            f"beam-temp-audit-{alive.name}-0123abcd"]
        work = sorted(p.name for p in (tmp_path / "system-tmp").iterdir())
        # split/merge sweep the work folders of earlier split/merge runs (anonymize makes none)
        assert work == [f"dicom-deid-{run.name}-abcd" for run in (dead, alive) if command == "anonymize" or run is alive]
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with open(tmp_root / (alive.name + ".lock"), "rb") as lock:  # released with its process
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_signal_in_beams_multi_processing_mode_stops_its_workers_first(monkeypatch: pytest.MonkeyPatch):
    """Beam's shutdown after SIGTERM or Ctrl-C waited forever for its multi_processing workers
    (measured: a hang in stop_worker). The command now stops its child processes, raises
    KeyboardInterrupt for the usual cleanup, and ends with 130 after a grace period anyway."""
    import signal
    import threading

    from pipelines import run as pipeline_run

    monkeypatch.setattr(cli, "_STOP_CHILDREN", False)  # and so restored at the end
    options = pipeline_run.pipeline_options(["--direct_running_mode", "multi_processing"])
    previous = signal.getsignal(signal.SIGINT)
    try:
        assert cli.quiet_local_workers(options, verbose=False, beam_args=[]) is True
        assert cli._STOP_CHILDREN and signal.getsignal(signal.SIGINT) is cli._on_terminate
    finally:
        signal.signal(signal.SIGINT, previous)
    # a stand-in for one of Beam's workers (other children, e.g. a test's servers, are spared)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                              "apache_beam.runners.worker.sdk_worker_main"])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    # the DirectRunner starts its workers through /bin/sh -c: a grandchild, stopped as well, and
    # ended before the cleanup runs (it wrote into the removed temporary folder, recreating it)
    shell = subprocess.Popen(["/bin/sh", "-c", f"'{sys.executable}' -c 'import time; time.sleep(120)' "
                              "apache_beam.runners.worker.sdk_worker_main; exit 0"])
    deadline = time.monotonic() + 30
    while not (grandchildren := Path(f"/proc/{shell.pid}/task/{shell.pid}/children").read_text().split()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    exits: list[int] = []
    ended = threading.Event()
    monkeypatch.setattr(cli, "INTERRUPT_GRACE_SECONDS", 0.2)
    monkeypatch.setattr(cli.os, "_exit", lambda code: (exits.append(code), ended.set()))
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    try:
        with pytest.raises(KeyboardInterrupt):
            cli._on_terminate(signal.SIGTERM, None)
        assert not cli._running(int(grandchildren[0]))
        assert shell.wait(timeout=30) == -signal.SIGTERM  # its command line names the worker too
        assert child.wait(timeout=30) == -signal.SIGTERM
        assert ended.wait(timeout=30) and exits == [cli.EXIT_INTERRUPTED]
        assert bystander.poll() is None
    finally:
        for process in (child, bystander, shell):
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    ("where", "location"),
    [("OUTPUT", "s3://bucket/out"), ("OUTPUT", "foo://out"), ("--audit", "s3://bucket/audit"),
     ("--crosswalk", "az://c/cw"), ("INPUT", "GS://bucket/in"), ("OUTPUT", "FILE:///tmp/x")],
)
def test_a_storage_we_do_not_write_to_is_refused_up_front(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         where, location):
    """It used to end a pipeline run with 'internal error (ValueError)' from Beam, after the
    progress folder and output claim were made; one-file mode and split/merge too."""
    write_study(make_study(seed=5, n_ct=1, rtstruct=False, sr=False), tmp_path / "in")
    locations = {"INPUT": str(tmp_path / "in"), "OUTPUT": str(tmp_path / "out")}
    options = {"--audit": None, "--crosswalk": None}
    (locations if where in locations else options)[where] = location
    extra = [arg for name, value in options.items() if value is not None for arg in (name, value)]
    scheme = location.split("://")[0]
    expected = f"dicom-deid: {where} {location!r}: unsupported storage {scheme}:// (give a local path, file:// or gs://)\n"
    assert cli.main(["anonymize", locations["INPUT"], locations["OUTPUT"], *extra]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.endswith(expected)
    if where != "INPUT":  # one file in (OUTPUT: a .dcm is local, so the storage is a folder's)
        one = sorted((tmp_path / "in").rglob("*.dcm"))[0]
        assert cli.main(["modify", str(one), locations["OUTPUT"], *extra]) == cli.EXIT_USAGE
        assert capsys.readouterr().err.endswith(expected)
    assert cli.main(["split", locations["INPUT"], locations["OUTPUT"], "--study", "1.2.3", "--body",
                     '{"Series": ["1.2.3.4"]}', *extra]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.endswith(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize(("command", "one_file"), [("anonymize", True), ("modify", True), ("split", False), ("merge", False)])
def test_help_offers_one_file_mode_only_where_it_exists(command: str, one_file: bool, capsys: pytest.CaptureFixture[str]):
    """split and merge refuse an OUTPUT ending in .dcm (they read whole studies): their help
    does not offer it."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert ("(or a .dcm file for one INPUT file)" in " ".join(capsys.readouterr().out.split())) is one_file


def test_a_run_killed_with_sigkill_is_finished_by_the_next_run(tmp_path: Path):
    """A real ``kill -9`` of the command and its workers part-way through a folder: what it
    leaves is what the next run cleans up, and the next run into the same OUTPUT ends with every
    input written once, byte for byte what an uninterrupted run writes, and no temporaries."""
    import fcntl
    import signal

    from tests.pipeline_support import output_files

    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "in"
    folder.mkdir()
    count = 400
    for i in range(count):
        source.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{i + 1}"
        source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
        source.save_as(folder / f"{i:04d}.dcm")
    exe = Path(sys.executable).with_name("dicom-deid")
    key = str(write_key(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    out, audit = tmp_path / "out", tmp_path / "out-audit"
    killed = subprocess.Popen([str(exe), "anonymize", str(folder), str(out), "--key-file", key, "--quiet",
                               "--processes", "2"], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        published: list[Path] = []
        while not published and killed.poll() is None and time.monotonic() < deadline:
            if out.is_dir():
                published = [p for p in out.rglob("*.dcm") if ".dicom-deid-tmp" not in p.parts]
            time.sleep(0.02)
        os.killpg(killed.pid, signal.SIGKILL)  # the command and every worker it started
    finally:
        killed.wait(timeout=60)
    assert published and killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    locks = [p for p in (out / ".dicom-deid-tmp").iterdir() if p.suffix == ".lock"]
    assert len(locks) == 1  # left behind, with the run's folder
    # The workers die with the command, a moment after it: until then the lock is held and the
    # next run would rightly take the folder for a live run's.
    with open(locks[0], "rb") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline + 60, "the killed run's workers still hold its lock"
                time.sleep(0.05)
    assert not audit.exists() or not read_rows(audit)  # no audit shard was committed

    assert cli.main(["anonymize", str(folder), str(out), "--key-file", key, "--quiet"]) == 0
    rows = read_rows(audit)
    assert sorted(r["source_uri"] for r in rows) == sorted(str(p) for p in folder.iterdir())
    assert {r["status"] for r in rows} == {"written"}
    assert cli.main(["anonymize", str(folder), str(tmp_path / "clean"), "--key-file", key, "--quiet"]) == 0
    assert output_files(out) == output_files(tmp_path / "clean")
    assert len(output_files(out)) == count


@pytest.mark.parametrize("runner", ["Direkt", "DirectRuner"])
def test_a_misspelt_runner_is_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture[str], runner: str):
    """An unknown --runner was taken for a remote runner, and the refusal said to give the key
    as gs:// (found by a review); Beam would refuse the name anyway, after those checks."""
    write_study(make_study(seed=5, n_ct=1, rtstruct=False, sr=False), tmp_path / "in")
    code = cli.main(["anonymize", str(tmp_path / "in"), str(tmp_path / "out"), "--key-file", str(write_key(tmp_path)),
                     "--runner", runner])
    line = _one_line_error(capsys.readouterr().err)
    assert code == cli.EXIT_USAGE
    assert line.startswith(f"dicom-deid: --runner {runner!r}: not a Beam runner (known: BundleBasedDirectRunner, "
                           "DataflowRunner, DirectRunner, ")
    assert not (tmp_path / "out").exists()


def test_a_prism_runner_that_cannot_start_is_named_not_an_internal_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Beam fetches Prism's binary on first use: offline, or with a --prism_location that is
    not one, the run used to end as "internal error (RuntimeError)"."""
    write_study(make_study(seed=5, n_ct=1, rtstruct=False, sr=False), tmp_path / "in")
    missing = str(tmp_path / "no-such-prism.zip")
    code = cli.main(["anonymize", str(tmp_path / "in"), str(tmp_path / "out"), "--key-file", str(write_key(tmp_path)),
                     "--runner", "PrismRunner", "--prism_location", missing, "--quiet"])
    assert code == cli.EXIT_INTERNAL
    err = _one_line_error(capsys.readouterr().err)
    # Beam's own words differ with what an earlier pipeline in the process left behind
    # ('Unable to parse binary URL "<path>"' on its own; 'Unable to fetch remote prism
    # binary ...' after the split and merge tests): ours around them do not
    assert err.startswith("dicom-deid: --runner PrismRunner could not start Prism: Unable to ")
    assert err.endswith("(Beam downloads or builds its Prism binary on first use: without a network, give "
                        "--prism_location a local copy of it, or use --runner DirectRunner)")


def test_gs_locations_refused_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Found by a review (GCS emulator): a whole-bucket OUTPUT put its default audit into
    another bucket (``gs://release-audit``, perhaps someone else's); a line break in a gs://
    --audit or --crosswalk (no Cloud Storage name holds one) passed the checks, and Beam's path
    parser failed after every output was written (exit 1). Neither reaches storage here."""
    write_study(make_study(seed=5, n_ct=1, rtstruct=False, sr=False), tmp_path / "in")
    key = ["--key-file", str(write_key(tmp_path))]
    cases = [
        (["gs://release"], "OUTPUT 'gs://release' is a whole bucket: give --audit (its default, "
         "'gs://release-audit', would be another bucket; the audit must lie outside OUTPUT: in a bucket of yours or "
         "a local folder)"),
        (["gs://release/"], "OUTPUT 'gs://release' is a whole bucket: give --audit"),
        ([str(tmp_path / "out"), "--audit", "gs://b/a\nb"], "--audit 'gs://b/a\\nb': a gs:// name cannot hold a line break"),
        ([str(tmp_path / "out"), "--crosswalk", "gs://b/cw\r"], "--crosswalk 'gs://b/cw\\r': a gs:// name cannot hold a line break"),
        (["gs://b/out\n"], "OUTPUT 'gs://b/out\\n': a gs:// name cannot hold a line break"),
    ]
    for args, message in cases:
        assert cli.main(["anonymize", str(tmp_path / "in"), *args, *key]) == cli.EXIT_USAGE, args
        assert _one_line_error(capsys.readouterr().err).startswith(f"dicom-deid: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deid.key", "in"]


def test_a_bucket_that_keeps_what_is_written_is_refused(monkeypatch: pytest.MonkeyPatch):
    """Found by a review: objects can be made but not deleted (a retention policy, no delete
    permission): the probe passed, every output was written, then Beam's audit sink failed to
    delete its temporary shard (exit 1, no audit)."""
    from transforms import files

    class Forbidden(Exception):
        pass

    made: list[str] = []

    class Blob:
        def __init__(self, name):
            self.name = name

        def upload_from_string(self, data):
            made.append(self.name)

        def delete(self):
            raise Forbidden("retention policy")

    class Bucket:
        def blob(self, name):
            return Blob(name)

    class Client:
        def bucket(self, name):
            assert name == "locked"
            return Bucket()

    monkeypatch.setattr(files, "_gcs_client", lambda uri: Client())
    assert files.probe_gcs_writable("gs://locked/audit", "run1") == \
        "Forbidden when deleting what it wrote: a retention policy or no delete permission"
    assert made == ["audit/.dicom-deid-probe-run1"]
    with pytest.raises(cli.UsageError, match=r"^--audit 'gs://locked/audit': cannot write there \(Forbidden when "):
        cli.probe_remote_locations("run1", **{"--audit": "gs://locked/audit"})


def test_a_crosswalk_in_a_sub_folder_keeps_a_later_release_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Found by a review: the kinds of an earlier run's folders were looked for at the top of
    each folder only, so a crosswalk written to rel/cw by one run let the next write its
    release into rel, beside original identifiers. The first sub-folders that are not study
    folders are looked at too; study folders (UID names) are not opened."""
    write_study(make_study(seed=5, n_ct=1, rtstruct=False, sr=False), tmp_path / "in")
    key = ["--key-file", str(write_key(tmp_path)), "--quiet"]
    rel = tmp_path / "rel"
    assert cli.main(["anonymize", str(tmp_path / "in"), str(tmp_path / "first"), "--crosswalk", str(rel / "cw"),
                     "--audit", str(rel / "audit"), *key]) == 0
    assert cli.main(["anonymize", str(tmp_path / "in"), str(rel), *key]) == cli.EXIT_USAGE
    assert _one_line_error(capsys.readouterr().err) == (
        f"dicom-deid: OUTPUT {str(rel)!r} already holds an audit and a crosswalk of an earlier run: give OUTPUT a "
        "folder of its own (keep original identifiers apart)")
    assert sorted(p.name for p in rel.iterdir()) == ["audit", "cw"]
    # a rerun into the release itself, whose study folders hold DICOM files: still allowed
    assert cli.main(["anonymize", str(tmp_path / "in"), str(tmp_path / "first"), "--crosswalk", str(rel / "cw"),
                     "--audit", str(rel / "audit"), *key]) == 0


def test_a_crosswalk_in_a_sub_folder_of_a_gs_output_is_found(monkeypatch: pytest.MonkeyPatch):
    """The gs:// side of the check above: one listing of OUTPUT, one of each non-study
    "folder" in it, never of the study folders."""
    from transforms import files

    tree = {"gs://b/rel": [("1.2.3", True), ("cw", True), ("notes.txt", False)],
            "gs://b/rel/cw": [("crosswalk-run1-00000-of-00001.parquet", False)]}
    listed: list[str] = []

    def list_top(folder, limit):
        listed.append(folder)
        return iter(tree.get(folder, []))

    monkeypatch.setattr(files, "list_gcs_top", list_top)
    assert cli._earlier_run_objects("gs://b/rel") == {"output", "crosswalk"}
    assert listed == ["gs://b/rel", "gs://b/rel/cw"]
    with pytest.raises(cli.UsageError, match=r"^OUTPUT 'gs://b/rel' already holds a crosswalk of an earlier run"):
        cli._refuse_earlier_runs_files("gs://b/rel", "gs://b/rel-audit", None, remote=True)
