"""Privacy end to end: no PHI, original identifier or key escapes the ``dicom-deid`` command.

Mission rules checked here, on the real command (a subprocess, the DirectRunner, logging at
DEBUG), over a folder holding a synthetic study with planted PHI (``tests.synthetic``) and
hostile files that carry PHI of their own:

- no planted value and no original UID appears in stdout/stderr, in any column of any audit
  row, in the summary files or in any output path; anonymized output bytes hold none of them
  except what the profile legitimately keeps (``expected_survivors``);
- the key (raw, hex, base64) is written nowhere: not in OUTPUT, the audit, the crosswalk or the
  console, whether it comes from ``--key-file``, ``DICOM_DEID_KEY`` or is drawn at random;
- the crosswalk does hold the original identifiers (its purpose), where it was asked to go;
- every input file has exactly one audit row, hostile ones with their reason code;
- refusals and file-level failures are one line naming the key or reason, never a file value.

Decision: a refused *request* may quote what the user typed in the body (an unknown tag name,
a value that does not fit its VR): the body is user input, not read from a patient file. It
must still quote nothing from the files, and nothing may be processed or written.

Decision: ``modify`` keeps PHI in its outputs by design, so only its console, audit and
summary are checked; the audit there may name the output's own Study/Series UIDs when the
modification kept them (an Instance-level modify, as in Orthanc), and nothing else original.
``source_uri`` holds the input path by design: the hostile files have neutral names.
"""

from __future__ import annotations

import base64
import collections
import copy
import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from tests.synthetic import (
    PATIENT_ID,
    PATIENT_NAME,
    PLANTED,
    dataset_bytes,
    expected_survivors,
    make_study,
    original_uids,
    write_study,
)
from tests.pipeline_support import explicit_element as _element
from transforms import dicomio
from transforms.identity import ENV_VAR
from transforms.orthanc_ids import orthanc_ids

CONSOLE_SCRIPT = Path(sys.executable).with_name("dicom-deid")
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # the synthetic originals' root (never in a 2.25 UID)

#: A key as `head -c 32 /dev/urandom > key` makes it (fixed here so the test can look for it).
FILE_KEY = bytes.fromhex("9f3c51e0a7d2486b0c1fe35a92b7d4c86e015af3b2c9d87e4f60a1b3c5d7e9f1")
#: A key as an environment variable holds it (UTF-8 text).
ENV_KEY = "privacy-env-key-7Q2mX9vL4pR8sT1w"

#: PHI carried by the hostile files (not in ``PLANTED``); each searched as is.
HOSTILE_PHI = {
    "dotdot_uid": "PHI-LEAK-UID",  # the SOPInstanceUID is '../../PHI-LEAK-UID'
    "private_note": "HOSTILE-PRIVATE-PLANTED",
    "undecodable_name": "HOSTILEPN",
    "undecodable_nested_name": "HOSTILENESTED",
    "deep_name": "DEEPPLANTED^PATIENT",
    "deep_id": "DEEP-PID-PLANTED",
    "text_name": "TEXTPLANTED^PATIENT",
}
_BAD_UTF8 = b"\xff\xfe\xc3\x28"  # same length as the b"XXXX" placeholders it replaces

# Every configuration of the logging subsystem is kept at DEBUG: the CLI lowers the root
# logger to INFO (--verbose) or WARNING, so its setLevel is neutralised. With
# PRIVACY_RECORD_SECRETS, every secrets.token_bytes() draw is recorded (hex) in that file, so
# a random key can be looked for afterwards; the record lives outside every checked folder.
_MAIN = r"""
import logging, os, secrets, sys
root = logging.getLogger()
root.setLevel(logging.DEBUG)
root.setLevel = lambda level: None
record = os.environ.pop("PRIVACY_RECORD_SECRETS", None)
if record:
    draw = secrets.token_bytes
    def recorded(n=None):
        value = draw(n)
        with open(record, "a", encoding="ascii") as f:
            f.write(value.hex() + "\n")
        return value
    secrets.token_bytes = recorded
from pipelines.cli import main
sys.exit(main(sys.argv[1:]))
"""


# --------------------------------------------------------------------------- the input folder


@dataclass(frozen=True)
class Corpus:
    folder: Path
    inputs: tuple[Path, ...]
    originals: tuple[Dataset, ...]  # every readable original (hostile bases before byte patching)
    original_uid_values: frozenset[str]
    phi: tuple[str, ...]  # PLANTED + HOSTILE_PHI
    outcome: dict[str, tuple[str, str | None]]  # relative name -> (status, reason) under anonymize
    study_uid: str  # of the synthetic study


def _deep_file(levels: int) -> tuple[bytes, list[str]]:
    """PHI at top level, then ``levels`` nested RequestAttributesSequence items."""
    study, series, sop = (f"{UID_ROOT}4242.{i}" for i in (1, 2, 3))
    opening = struct.pack("<HH2sHI", 0x0040, 0x0275, b"SQ", 0, 0xFFFFFFFF) + struct.pack(
        "<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    body = (
        _element(0x0008, 0x0016, b"UI", CT_CLASS.encode())
        + _element(0x0008, 0x0018, b"UI", sop.encode())
        + _element(0x0008, 0x0060, b"CS", b"CT")
        + _element(0x0010, 0x0010, b"PN", HOSTILE_PHI["deep_name"].encode())
        + _element(0x0010, 0x0020, b"LO", HOSTILE_PHI["deep_id"].encode())
        + _element(0x0020, 0x000D, b"UI", study.encode())
        + _element(0x0020, 0x000E, b"UI", series.encode())
        + opening * levels
        + closing * levels
    )
    return dicomio.encode_file_meta(CT_CLASS, sop, EXPLICIT_LE) + body, [study, series, sop]


def _undecodable_base() -> Dataset:
    """A CT (its own UIDs) whose charset is UTF-8 and whose PHI holds ``XXXX`` placeholders."""
    ds = make_study(seed=8, n_ct=1, rtstruct=False, sr=False)[0]
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = HOSTILE_PHI["undecodable_name"] + "XXXX^PLANTEDGIVEN"
    ds.SourcePatientGroupIdentificationSequence[0].PatientName = HOSTILE_PHI["undecodable_nested_name"] + "XXXX"
    ds.private_block(0x0009, "PLANTEDCORP 1.0").add_new(0x20, "LO", HOSTILE_PHI["private_note"] + "-XXXX")
    # A nested reference whose UID bytes are not even ASCII.
    ref = Dataset()
    ref.ReferencedSOPClassUID = CT_CLASS
    ref.ReferencedSOPInstanceUID = UID_ROOT + "4343.XXXX"
    ds.ReferencedImageSequence = DicomSequence([ref])
    return ds


def build_corpus(folder: Path) -> Corpus:
    """The synthetic study plus hostile files, each with PHI; see ``Corpus.outcome``."""
    study = make_study(seed=7)
    paths = write_study(study, folder / "study")
    hostile = folder / "hostile"
    hostile.mkdir()
    ct = paths[0].read_bytes()
    name_at = ct.index(PATIENT_NAME.encode())
    assert name_at < len(ct) // 2  # the truncated copy still holds the patient module
    (hostile / "truncated.dcm").write_bytes(ct[: len(ct) * 2 // 3])

    dotdot = copy.deepcopy(study[-1])  # the SR: references, nested PHI
    dotdot.SOPInstanceUID = "../../" + HOSTILE_PHI["dotdot_uid"]
    dotdot.file_meta.MediaStorageSOPInstanceUID = dotdot.SOPInstanceUID
    (hostile / "dotdot_uid.dcm").write_bytes(dataset_bytes(dotdot))

    undecodable = _undecodable_base()
    data = dataset_bytes(undecodable)
    assert data.count(b"XXXX") == 4
    (hostile / "private_undecodable.dcm").write_bytes(data.replace(b"XXXX", _BAD_UTF8))

    deep, deep_uids = _deep_file(100_000)
    (hostile / "deep.dcm").write_bytes(deep)

    (hostile / "patient_list.txt").write_bytes(
        f"{HOSTILE_PHI['text_name']} {PATIENT_NAME} {PATIENT_ID} 1945-03-17\n".encode() * 20
    )

    originals = (*study, undecodable)
    uids = original_uids(originals) | set(deep_uids)
    uids.discard(undecodable.ReferencedImageSequence[0].ReferencedSOPInstanceUID)  # written as bad bytes
    uids.add(UID_ROOT + "4343.")  # its readable prefix must not survive either
    outcome: dict[str, tuple[str, str | None]] = {f"study/{p.name}": ("written", None) for p in paths}
    outcome.update(
        {
            "hostile/truncated.dcm": ("failed", "truncated"),
            "hostile/dotdot_uid.dcm": ("failed", "invalid_uid"),
            "hostile/private_undecodable.dcm": ("written", None),
            "hostile/deep.dcm": ("failed", "too_deep"),
            "hostile/patient_list.txt": ("failed", "not_dicom"),
        }
    )
    inputs = tuple(sorted(p for p in folder.rglob("*") if p.is_file()))
    assert sorted(p.relative_to(folder).as_posix() for p in inputs) == sorted(outcome)
    return Corpus(
        folder=folder,
        inputs=inputs,
        originals=originals,
        original_uid_values=frozenset(uids),
        phi=(*PLANTED, *HOSTILE_PHI.values()),
        outcome=outcome,
        study_uid=study[0].StudyInstanceUID,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("privacy") / "in")


def test_corpus_hostile_files_are_what_they_claim(corpus: Corpus):
    """The reader's own verdicts, so the end-to-end expectations below are honest."""
    for path in corpus.inputs:
        name = path.relative_to(corpus.folder).as_posix()
        try:
            dicomio.read_dataset(path.read_bytes())
            got: tuple[str, str | None] = ("read", None)
        except Exception as exc:  # noqa: BLE001
            got = ("failed", getattr(exc, "reason", type(exc).__name__))
        expected = corpus.outcome[name]
        assert got == (expected if expected[0] == "failed" else ("read", None)), name
    # each hostile file does carry the PHI it is meant to test
    raw = {p.name: p.read_bytes() for p in corpus.inputs}
    assert PATIENT_NAME.encode() in raw["truncated.dcm"] and PATIENT_NAME.encode() in raw["dotdot_uid.dcm"]
    assert b"../../PHI-LEAK-UID" in raw["dotdot_uid.dcm"]
    assert raw["private_undecodable.dcm"].count(_BAD_UTF8) == 4
    for marker in ("private_note", "undecodable_name", "undecodable_nested_name"):
        assert HOSTILE_PHI[marker].encode() in raw["private_undecodable.dcm"]
    assert HOSTILE_PHI["deep_name"].encode() in raw["deep.dcm"] and len(raw["deep.dcm"]) > 1_000_000


# --------------------------------------------------------------------------- running and scanning


def run_cli(
    args: list[str], *, env: dict[str, str] | None = None, record: Path | None = None, console_script: bool = False
) -> subprocess.CompletedProcess[bytes]:
    """The command in a subprocess (DEBUG logging unless ``console_script``); bytes captured."""
    environ = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "DICOM_DEID_DEBUG", "PRIVACY_RECORD_SECRETS")}
    environ.update(env or {})
    if record is not None:
        environ["PRIVACY_RECORD_SECRETS"] = str(record)
    if not console_script:
        command = [sys.executable, "-c", _MAIN, *args]
    elif CONSOLE_SCRIPT.exists():
        command = [str(CONSOLE_SCRIPT), *args]
    else:  # not installed beside this interpreter: the same entry point
        command = [sys.executable, "-m", "pipelines.cli", *args]
    return subprocess.run(command, capture_output=True, env=environ, timeout=300, check=False)


def key_forms(secret: bytes) -> list[bytes]:
    """The key as it could be written: raw, hex, base64 (standard, URL-safe, unpadded)."""
    forms = [secret, secret.hex().encode(), secret.hex().upper().encode()]
    for encoded in (base64.b64encode(secret), base64.urlsafe_b64encode(secret)):
        forms += [encoded, encoded.rstrip(b"=")]
    return forms


def parquet_text(folder: Path) -> str:
    """Every value of every column of every Parquet file under ``folder``, as text."""
    parts = []
    for path in sorted(folder.rglob("*.parquet")):
        table = pq.read_table(path)
        for name in table.column_names:
            parts += [str(v) for v in table.column(name).to_pylist() if v is not None]
    return "\n".join(parts)


def parquet_rows(folder: Path, prefix: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted(folder.glob(f"{prefix}*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def tree_blob(folder: Path) -> bytes:
    """Relative paths and raw bytes of every file under ``folder``, plus decoded Parquet values
    (Parquet pages may be compressed, so raw bytes alone could hide a value)."""
    if not folder.exists():
        return b""
    parts = []
    for path in sorted(folder.rglob("*")):
        parts.append(path.relative_to(folder).as_posix().encode())
        if path.is_file():
            parts.append(path.read_bytes())
    parts.append(parquet_text(folder).encode("utf-8", "surrogateescape"))
    return b"\n".join(parts)


def found_in(places: dict[str, bytes], needles: Iterable[str | bytes]) -> dict[str, list[str]]:
    """``{place: [needles found there]}``, empty when nothing leaked."""
    wanted = [n.encode() if isinstance(n, str) else n for n in needles]
    leaks = {}
    for place, blob in places.items():
        hits = sorted({n.decode("latin-1") for n in wanted if n and n in blob})
        if hits:
            leaks[place] = hits
    return leaks


def original_orthanc_ids(corpus: Corpus) -> set[str]:
    """Orthanc ids of the *original* resources: hashes of original identifiers, crosswalk-only."""
    ids: set[str] = set()
    for ds in corpus.originals:
        ids |= set(
            orthanc_ids(str(ds.PatientID), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID).values()
        )
    return ids


def assert_one_row_per_input(rows: list[dict[str, Any]], corpus: Corpus, outcome: dict[str, tuple[str, str | None]]):
    counts = collections.Counter(r["source_uri"] for r in rows)
    assert counts == collections.Counter({str(p): 1 for p in corpus.inputs})
    got = {Path(r["source_uri"]).relative_to(corpus.folder).as_posix(): (r["status"], r["reason"]) for r in rows}
    assert got == outcome


def assert_clean_console(done: subprocess.CompletedProcess[bytes]) -> None:
    assert b"Traceback" not in done.stderr, done.stderr.decode(errors="replace")[-3000:]


# --------------------------------------------------------------------------- anonymize


@dataclass(frozen=True)
class AnonymizeRun:
    version: str
    key: str  # "file" | "env" | "random"
    beam: tuple[str, ...] = ()
    resources: bool = False  # select the synthetic study by its original StudyInstanceUID


ANONYMIZE_RUNS = {
    "key-file/2023b/in-memory": AnonymizeRun("2023b", "file"),
    "env-key/2008/multi-processing": AnonymizeRun(
        "2008", "env", ("--direct_num_workers", "2", "--direct_running_mode", "multi_processing")
    ),
    "random-key/2017c/resources": AnonymizeRun("2017c", "random", resources=True),
}


@pytest.mark.parametrize("name", list(ANONYMIZE_RUNS))
def test_anonymize_leaks_nothing(name: str, corpus: Corpus, tmp_path: Path):
    spec = ANONYMIZE_RUNS[name]
    out, audit, cw = tmp_path / "out", tmp_path / "audit", tmp_path / "custodian" / "crosswalk"
    body: dict[str, Any] = {} if spec.version == "2023b" else {"DicomVersion": spec.version}
    if spec.resources:
        body["Resources"] = [corpus.study_uid]
    args = ["anonymize", str(corpus.folder), str(out), "--audit", str(audit), "--crosswalk", str(cw), "--verbose"]
    if body:
        args += ["--body", json.dumps(body)]
    scratch = tmp_path / "scratch"  # the run's TMPDIR: whatever lands there is checked too
    scratch.mkdir()
    env: dict[str, str] = {"TMPDIR": str(scratch)}
    record = None
    if spec.key == "file":
        key_path = tmp_path / "secret" / "deid.key"
        key_path.parent.mkdir()
        key_path.write_bytes(FILE_KEY)
        args += ["--key-file", str(key_path), "--progress"]
        secrets_used = [FILE_KEY]
    elif spec.key == "env":
        env[ENV_VAR] = ENV_KEY
        secrets_used = [ENV_KEY.encode()]
    else:
        record = tmp_path / "secret-draws.txt"
    done = run_cli([*args, *spec.beam], env=env, record=record)
    if record is not None:
        secrets_used = [bytes.fromhex(line) for line in record.read_text().split()]
        assert secrets_used, "no random key was drawn through secrets.token_bytes: the random-key check is void"

    outcome = dict(corpus.outcome)
    if spec.resources:
        outcome["hostile/private_undecodable.dcm"] = ("skipped", "not_selected")
    failed = sum(1 for status, _ in outcome.values() if status == "failed")
    assert done.returncode == 3, done.stderr.decode(errors="replace")[-3000:]
    assert_clean_console(done)
    assert b"DEBUG " in done.stderr  # the logs really ran at DEBUG
    if spec.key == "random":
        assert b"warning: no --key-file and no DICOM_DEID_KEY: random key " in done.stderr

    # one audit row per input, the hostile ones with their reason
    rows = parquet_rows(audit, "audit-")
    assert_one_row_per_input(rows, corpus, outcome)
    summary = json.loads((audit / "summary.json").read_text())
    assert (summary["InputFiles"], summary["FailedInstancesCount"]) == (len(corpus.inputs), failed)
    assert json.loads(done.stdout) == summary

    # outputs: named by new UIDs only, nothing but the written files, none inside OUT from us
    written = {r["output_uri"]: r for r in rows if r["status"] == "written"}
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert sorted(map(str, files)) == sorted(written)
    for path in files:
        assert re.fullmatch(r"2\.25\.[0-9]+/2\.25\.[0-9]+/2\.25\.[0-9]+\.dcm", path.relative_to(out).as_posix())

    # no planted value, original UID or original Orthanc id in console, audit, summary, names
    forbidden = [*corpus.phi, *sorted(corpus.original_uid_values)]
    places = {"stdout": done.stdout, "stderr": done.stderr, "audit folder": tree_blob(audit)}
    places["output paths"] = "\n".join(p.relative_to(out).as_posix() for p in out.rglob("*")).encode()
    assert found_in(places, forbidden) == {}
    assert found_in({"audit folder": places["audit folder"], "stdout": done.stdout}, original_orthanc_ids(corpus)) == {}

    # output bytes: only what the profile keeps (e.g. dates under 2008)
    survivors = expected_survivors(corpus.originals, spec.version, values=forbidden)
    assert not survivors & set(HOSTILE_PHI.values())
    for path in files:
        data = path.read_bytes()
        assert found_in({path.name: data}, set(forbidden) - survivors) == {}
        assert pydicom.dcmread(path).PatientIdentityRemoved == "YES"

    # the key: nowhere (the crosswalk included)
    places["output files"] = tree_blob(out)
    places["crosswalk"] = tree_blob(cw)
    places["TMPDIR"] = tree_blob(scratch)
    assert found_in({"TMPDIR": places["TMPDIR"]}, forbidden) == {}
    for secret in secrets_used:
        assert found_in(places, key_forms(secret)) == {}

    # the crosswalk is where it was asked, outside OUT and the audit, and holds the originals
    assert not list(out.rglob("*.parquet")) and not list(out.rglob("*.json"))
    assert found_in({"crosswalk": places["crosswalk"]}, [PATIENT_ID, corpus.study_uid]) == {
        "crosswalk": sorted([PATIENT_ID, corpus.study_uid])
    }  # the scan reads Parquet values: the same check on the audit is not void
    crosswalk = parquet_rows(cw, "crosswalk-")
    assert sorted(r["source_uri"] for r in crosswalk) == sorted(r["source_uri"] for r in written.values())
    originals_by_sop = {ds.SOPInstanceUID: ds for ds in corpus.originals}
    for row in crosswalk:
        ds = originals_by_sop[row["original_sop_instance_uid"]]
        assert (
            row["original_patient_id"],
            row["original_study_instance_uid"],
            row["original_series_instance_uid"],
        ) == (
            PATIENT_ID,
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
        )
        assert row["new_sop_instance_uid"] == written[row["output_uri"]]["sop_instance_uid"] != ds.SOPInstanceUID


# --------------------------------------------------------------------------- modify


def _key_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret" / "deid.key"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(FILE_KEY)
    return path


def test_modify_replacing_patient_name_keeps_it_out_of_logs_and_audit(corpus: Corpus, tmp_path: Path):
    """Modify keeps most PHI in its outputs by design; the console and the audit carry none."""
    out, audit = tmp_path / "out", tmp_path / "audit"
    body = {"Replace": {"PatientName": "MODIFIED^NAME"}}
    args = ["modify", str(corpus.folder), str(out), "--audit", str(audit), "--key-file", str(_key_file(tmp_path))]
    done = run_cli([*args, "--body", json.dumps(body), "--verbose"], console_script=True)
    assert done.returncode == 3, done.stderr.decode(errors="replace")[-3000:]
    assert_clean_console(done)
    rows = parquet_rows(audit, "audit-")
    assert_one_row_per_input(rows, corpus, corpus.outcome)

    # the outputs did hold PHI that could have leaked (modify keeps it), but not the old name
    outputs = [pydicom.dcmread(r["output_uri"]) for r in rows if r["status"] == "written"]
    assert {str(ds.PatientName) for ds in outputs} == {"MODIFIED^NAME"}
    assert all(PATIENT_ID.encode() in Path(r["output_uri"]).read_bytes() for r in rows if r["status"] == "written")

    # UIDs that name the output itself (kept by an Instance-level modify) may appear in the audit
    # and the output paths; every other original UID may not.
    own = {uid for ds in outputs for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID)} & corpus.original_uid_values
    forbidden = [*corpus.phi, *sorted(corpus.original_uid_values - own)]
    places = {"stdout": done.stdout, "stderr": done.stderr, "audit folder": tree_blob(audit)}
    places["output paths"] = "\n".join(p.relative_to(out).as_posix() for p in out.rglob("*")).encode()
    assert found_in(places, forbidden) == {}
    places["output files"] = tree_blob(out)
    assert found_in(places, key_forms(FILE_KEY)) == {}


def test_modify_file_level_failures_name_no_value(corpus: Corpus, tmp_path: Path):
    """A request valid for the run that fails on some files (JPEG baseline cannot hold 12-bit
    CT): the failure rows and the console name the reason, never a value of those files."""
    out, audit = tmp_path / "out", tmp_path / "audit"
    body = {"Replace": {"PatientName": "MODIFIED^NAME"}, "Transcode": JPEG_BASELINE}
    args = ["modify", str(corpus.folder), str(out), "--audit", str(audit), "--key-file", str(_key_file(tmp_path))]
    done = run_cli([*args, "--body", json.dumps(body), "--verbose"])
    assert done.returncode == 3
    assert_clean_console(done)
    rows = parquet_rows(audit, "audit-")
    outcome = dict(corpus.outcome)
    for name in ("study/000_CT.dcm", "study/001_CT.dcm", "study/002_CT.dcm", "hostile/private_undecodable.dcm"):
        outcome[name] = ("failed", "cannot_transcode")
    assert_one_row_per_input(rows, corpus, outcome)
    for row in rows:
        if row["reason"] == "cannot_transcode":
            assert row["detail"].startswith("transcode: ") and row["output_uri"] is None
    own = set()
    for row in rows:
        if row["status"] == "written":
            ds = pydicom.dcmread(row["output_uri"])
            own |= {ds.StudyInstanceUID, ds.SeriesInstanceUID}
    forbidden = [*corpus.phi, *sorted(corpus.original_uid_values - own)]
    places = {"stdout": done.stdout, "stderr": done.stderr, "audit folder": tree_blob(audit)}
    assert found_in(places, forbidden) == {}


# --------------------------------------------------------------------------- refusals


REFUSED = {
    # an unknown tag name that is itself a patient's name: quoted back (user input, see module doc)
    "unknown-tag-named-like-a-patient": (
        "modify",
        ["--body", json.dumps({"Replace": {PATIENT_NAME: "x"}})],
        (
            f"dicom-deid: Replace: unknown tag '{PATIENT_NAME}' (expected a DICOM keyword such as 'PatientName', "
            "a name from the configured Dictionary, or hex 'gggg,eeee', 'gggg-eeee', 'ggggeeee')"
        ),
        PATIENT_NAME,
    ),
    # a value that does not fit its VR: quoted back as well
    "value-not-fitting-vr": (
        "anonymize",
        ["--body", json.dumps({"Replace": {"Rows": "TYPED-PLANTED-ROWS"}})],
        "dicom-deid: Replace: tag 'Rows' (0028,0010) (US): 'TYPED-PLANTED-ROWS' is not an integer in 0..65535",
        "TYPED-PLANTED-ROWS",
    ),
    # broken JSON holding PHI: the error gives line and column, not the text
    "broken-json-config": (
        "modify",
        ["--config", "CONFIG"],
        "dicom-deid: --config 'CONFIG': invalid JSON at line 2 column 1: Expecting ',' delimiter",
        None,
    ),
    # a comment first (json5 reads it): the place json5 stopped, still not the text there
    "broken-commented-json": (
        "modify",
        ["--body", '// relabel\n{"Replace": {"PatientName": "' + PATIENT_NAME + '" "PatientID": "' + PATIENT_ID + '"}}'],
        f"dicom-deid: --body: invalid JSON at line 2 column {len(PATIENT_NAME) + 32}: unexpected character",
        None,
    ),
    # a key given twice: named (tag names, not values), nothing of the values
    "duplicate-key": (
        "anonymize",
        ["--body", json.dumps({"Replace": {"PatientName": PATIENT_NAME}})[:-1] + ', "Replace": {"PatientID": "' + PATIENT_ID + '"}}'],
        "dicom-deid: --body: key 'Replace' is given twice in one object (Orthanc would keep the last one silently); give it once",
        None,
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_request_is_one_line_without_file_values(case: str, corpus: Corpus, tmp_path: Path):
    command, extra, message, echoed = REFUSED[case]
    if extra[-1] == "CONFIG":
        config = tmp_path / "body.json"
        config.write_text('{"Replace": {"PatientName": "' + PATIENT_NAME + '", "PatientID": "' + PATIENT_ID + '"\n')
        extra, message = [extra[0], str(config)], message.replace("CONFIG", str(config))
    out, audit = tmp_path / "out", tmp_path / "audit"
    args = [command, str(corpus.folder), str(out), "--audit", str(audit), "--key-file", str(_key_file(tmp_path))]
    done = run_cli([*args, *extra])
    assert done.returncode == 2
    assert done.stdout == b""
    lines = [line for line in done.stderr.decode().splitlines() if not line.startswith(("DEBUG ", "INFO "))]
    assert lines == [message]
    allowed = {echoed, *(echoed.split("^") if echoed else [])}
    forbidden = [v for v in (*corpus.phi, *sorted(corpus.original_uid_values)) if v not in allowed]
    assert found_in({"stderr": done.stderr}, forbidden) == {}
    assert found_in({"stderr": done.stderr}, key_forms(FILE_KEY)) == {}
    assert not out.exists() and not audit.exists()  # refused before anything was processed


def test_short_env_key_is_refused_without_quoting_it(corpus: Corpus, tmp_path: Path):
    done = run_cli(["anonymize", str(corpus.folder), str(tmp_path / "out")], env={ENV_VAR: "SHORTKEY-PLANT"})
    assert done.returncode == 2
    assert_clean_console(done)
    assert b"SHORTKEY" not in done.stderr and b"SHORTKEY" not in done.stdout
    assert b"DICOM_DEID_KEY" in done.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- one-file mode


SINGLE = {
    "hostile/truncated.dcm": "truncated",
    "hostile/dotdot_uid.dcm": "invalid_uid",
    "hostile/deep.dcm": "too_deep",
    "hostile/patient_list.txt": "not_dicom",
}


@pytest.mark.parametrize("name", list(SINGLE))
def test_single_file_failure_is_one_line_and_leaves_nothing(name: str, corpus: Corpus, tmp_path: Path):
    source = corpus.folder / name
    target = tmp_path / "result" / "out.dcm"
    audit = tmp_path / "audit"
    done = run_cli(
        ["anonymize", str(source), str(target), "--key-file", str(_key_file(tmp_path)), "--audit", str(audit)]
    )
    assert done.returncode == 3
    assert done.stdout == b""
    stderr = done.stderr.decode()
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("DEBUG ")]
    assert lines == [lines[0]] and lines[0].startswith(f"dicom-deid: {source}: {SINGLE[name]}: "), stderr
    assert not target.exists()
    assert not target.parent.exists() or list(target.parent.iterdir()) == []  # no temporary left
    rows = parquet_rows(audit, "audit-")
    assert [(r["source_uri"], r["status"], r["reason"]) for r in rows] == [(str(source), "failed", SINGLE[name])]
    forbidden = [*corpus.phi, *sorted(corpus.original_uid_values)]
    places = {"stderr": done.stderr, "audit folder": tree_blob(audit)}
    assert found_in(places, forbidden) == {}
    assert found_in(places, key_forms(FILE_KEY)) == {}


def test_single_file_success_keeps_only_survivors(corpus: Corpus, tmp_path: Path):
    source = corpus.folder / "study" / "004_SR.dcm"
    target = tmp_path / "out.dcm"
    done = run_cli(["anonymize", str(source), str(target), "--key-file", str(_key_file(tmp_path))])
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert [line for line in done.stderr.decode().splitlines() if not line.startswith("DEBUG ")] == []
    forbidden = [*corpus.phi, *sorted(corpus.original_uid_values)]
    survivors = expected_survivors([pydicom.dcmread(source)], "2023b", values=forbidden)
    places = {"stderr": done.stderr, "output": target.read_bytes()}
    assert found_in(places, set(forbidden) - survivors) == {}
    assert found_in(places, key_forms(FILE_KEY)) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.dcm", "secret"]


def test_transcode_failure_detail_quotes_no_file_value(tmp_path: Path):
    """A CT whose PhotometricInterpretation holds a name (a valid CS string, misplaced by some
    exporter): the transcode fails, and its audit detail and console line must not quote it.

    transforms/transcode.py promises messages that "never [contain] patient data", but its
    catch-all wraps the codec's exception text (``_describe(exc)``), and pydicom's text
    quotes the element value."""
    ds = make_study(seed=9, n_ct=1, rtstruct=False, sr=False)[0]
    ds.PhotometricInterpretation = "PLANTEDGIVEN"
    source = tmp_path / "in.dcm"
    source.write_bytes(dataset_bytes(ds))
    target, audit = tmp_path / "result" / "out.dcm", tmp_path / "audit"
    args = ["anonymize", str(source), str(target), "--key-file", str(_key_file(tmp_path)), "--audit", str(audit)]
    done = run_cli([*args, "--body", json.dumps({"Transcode": RLE_LOSSLESS})])
    assert done.returncode == 3
    rows = parquet_rows(audit, "audit-")
    assert [(r["status"], r["reason"]) for r in rows] == [("failed", "cannot_transcode")]
    assert rows[0]["detail"].startswith("transcode: ")
    assert not target.exists()
    places = {"stderr": done.stderr, "audit folder": tree_blob(audit)}
    assert found_in(places, ["PLANTEDGIVEN", PATIENT_NAME, PATIENT_ID]) == {}
