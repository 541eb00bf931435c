"""The pipeline's local fast paths (plain ``os`` calls instead of Beam's filesystem layer) give
exactly what the general paths give: same bytes, same refusals, same error types."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import apache_beam as beam
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset

from pipelines import run as pipeline_run
from schemas.audit import AUDIT_SCHEMA, audit_row, utc_now
from tests.pipeline_support import KEY
from transforms import dicomio, engine, request
from transforms.beam import RunConfig, process_file, publish, read_bounded, safe_str, safe_transfer_syntax
from transforms.errors import InputError

CT = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
ANONYMIZE = request.parse_anonymize({})


def test_read_bounded_local_returns_the_file_bytes(tmp_path: Path):
    data = CT.read_bytes()
    assert read_bounded(str(CT), 2 << 30) == data
    assert read_bounded(str(CT), len(data)) == data  # exactly at the limit: accepted
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    assert read_bounded(str(empty), 10) == b""


def test_read_bounded_local_refuses_one_byte_over(tmp_path: Path):
    with pytest.raises(InputError) as info:
        read_bounded(str(CT), CT.stat().st_size - 1)
    assert info.value.reason == "too_large"
    assert str(info.value) == f"file is larger than --max-bytes ({CT.stat().st_size - 1} bytes)"


def test_read_bounded_local_reads_past_a_stale_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A file that grew after fstat (here: fstat reporting 100 bytes) is read to its end, and
    still refused once it passes the limit."""
    data = CT.read_bytes()
    monkeypatch.setattr(os, "fstat", lambda fd: SimpleNamespace(st_size=100, st_mode=stat.S_IFREG | 0o644))
    assert read_bounded(str(CT), 2 << 30) == data
    with pytest.raises(InputError) as info:
        read_bounded(str(CT), len(data) - 1)
    assert info.value.reason == "too_large"


def test_unreadable_local_input_is_a_read_error_naming_the_type(tmp_path: Path):
    cfg = RunConfig(plan=request.parse_anonymize({}), output_root=str(tmp_path / "out"), run_id="r", key_id=KEY.key_id, key=KEY)
    folder = tmp_path / "a-folder.dcm"
    folder.mkdir()
    row, _ = process_file(str(folder), 4096, cfg, KEY)
    assert (row["status"], row["reason"], row["detail"]) == ("failed", "read_error", "read: IsADirectoryError EISDIR")
    row, _ = process_file(str(tmp_path / "gone.dcm"), 10, cfg, KEY)
    assert (row["status"], row["reason"], row["detail"]) == ("failed", "read_error", "read: FileNotFoundError ENOENT")


def test_publish_local_creates_missing_levels_and_reports_a_file_in_the_way(tmp_path: Path):
    out = tmp_path / "out"
    data = b"DICM-bytes"
    sha = hashlib.sha256(data).hexdigest()
    final = out / "1.2" / "1.2.3" / "1.2.3.4.dcm"  # neither folder exists yet
    publish(data, sha, str(final), str(out), "run")
    assert final.read_bytes() == data
    second = out / "1.2" / "1.2.9" / "1.2.9.1.dcm"  # study folder exists, series does not
    publish(data, sha, str(second), str(out), "run")
    assert second.read_bytes() == data
    (out / "1.5").write_bytes(b"a file where a study folder belongs")
    with pytest.raises(NotADirectoryError):
        publish(data, sha, str(out / "1.5" / "1.5.1" / "1.5.1.1.dcm"), str(out), "run")
    assert not list((out / ".dicom-deid-tmp" / "run").iterdir())  # no temporary left behind


def test_local_runs_skip_beams_runner_api_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Beam skips the to_runner_api/from_runner_api round trip for its own DirectRunner in batch;
    execute() asks the same for LocalDirectRunner (a subclass Beam does not recognise)."""
    calls: list[bool] = []
    real_run = beam.Pipeline.run

    def spy(self, test_runner_api="AUTO"):
        calls.append(test_runner_api)
        return real_run(self, test_runner_api)

    monkeypatch.setattr(beam.Pipeline, "run", spy)
    src = tmp_path / "in"
    src.mkdir()
    (src / "ct.dcm").write_bytes(CT.read_bytes())
    cfg = RunConfig(plan=request.parse_anonymize({}), output_root=str(tmp_path / "out"), run_id="r1", key_id=KEY.key_id, key=KEY)
    outcome = pipeline_run.execute(
        pipeline_run.pipeline_options([]), str(src), cfg, str(tmp_path / "audit"), reproducible=True
    )
    assert outcome.summary["Statuses"] == {"written": 1, "failed": 0, "skipped": 0}
    assert calls == [False]


def _audit_rows(count: int) -> list[dict]:
    rows = []
    for i in range(count):
        fields = dict(
            source_uri=f"/in/{i}.dcm", operation="anonymize", profile="2023b", request="{}", key_id="k", run_id="r",
            bytes_in=1000 + i, started_at=utc_now(), finished_at=utc_now(),
        )
        if i % 3:
            fields.update(status="written", output_uri=f"/out/{i}.dcm", bytes_out=2000 + i, output_sha256="ab" * 32, modality="CT")
        else:
            fields.update(status="failed", reason="truncated", detail="parse: file ends inside an element header")
        rows.append(audit_row(**fields))
    return rows


@pytest.mark.parametrize("batch_rows, table_bytes", [(1000, 64 << 20), (3, 64 << 20), (3, 1)])
def test_rows_to_parquet_writes_what_beams_writer_writes(tmp_path: Path, batch_rows: int, table_bytes: int, monkeypatch: pytest.MonkeyPatch):
    """Same table as beam.io.WriteToParquet for the same rows, whatever the batch boundaries
    (one table per bundle, several record batches, a table per batch)."""
    rows = _audit_rows(8)
    real_init = pipeline_run.RowsToArrow.__init__
    monkeypatch.setattr(
        pipeline_run.RowsToArrow, "__init__", lambda self, schema: real_init(self, schema, batch_rows=batch_rows, table_bytes=table_bytes)
    )
    with beam.Pipeline(runner=pipeline_run.LocalDirectRunner()) as p:
        pcoll = p | beam.Create(rows)
        pcoll | "Ours" >> pipeline_run.WriteRowsToParquet(str(tmp_path / "ours"), AUDIT_SCHEMA)
        pcoll | "Beams" >> beam.io.WriteToParquet(str(tmp_path / "beams"), AUDIT_SCHEMA, file_name_suffix=".parquet")
    ours = pipeline_run.read_parquet_prefix(str(tmp_path / "ours"), AUDIT_SCHEMA)
    beams = pipeline_run.read_parquet_prefix(str(tmp_path / "beams"), AUDIT_SCHEMA)
    assert ours.schema == beams.schema == AUDIT_SCHEMA
    assert ours.num_rows == 8
    assert sorted(ours.to_pylist(), key=lambda r: r["source_uri"]) == sorted(beams.to_pylist(), key=lambda r: r["source_uri"])


# --------------------------------------------------------------------------- identifiers read raw


def _pydicom_str(ds, keyword: str):
    """What safe_str returns without its raw fast path: pydicom's conversion, stripped (a
    PatientID keeps its leading spaces and joins several values with a backslash, as Orthanc's
    ids take them)."""
    from pydicom.multival import MultiValue

    value = dicomio.peek(ds, keyword)
    if keyword == "PatientID":
        if isinstance(value, MultiValue):
            value = "\\".join(str(v) for v in value)
        return value.rstrip(" \0") if isinstance(value, str) else None
    return value.strip(" \0") if isinstance(value, str) else None


def _pydicom_syntax(ds):
    """What safe_transfer_syntax returned before its raw fast path (pydicom converts in place)."""
    value = str(dicomio.transfer_syntax_of(ds)).strip(" \0")
    return value if value and len(value) <= 64 and re.match(r"^[0-9]+(\.[0-9]+)*$", value) else None


def _all_test_files(samples: Path) -> list[Path]:
    paths = [p for p in sorted(samples.rglob("*")) if p.is_file()]
    paths += sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm"))  # bundled only, no download
    return paths


def test_raw_identifier_fast_paths_agree_with_pydicom_on_real_files(samples: Path):
    """PatientID and the transfer syntax read from the raw bytes equal pydicom's decoding on
    every shared sample and pydicom test file that the reader accepts (and on the engine's
    output), and reading them leaves the elements raw."""
    from pydicom.dataelem import RawDataElement

    compared = raw_pids = raw_syntaxes = 0
    for path in _all_test_files(samples):
        try:
            ds = dicomio.read_dataset(path.read_bytes())
        except Exception:  # noqa: BLE001 - not readable: not part of this comparison
            continue
        for dataset in (ds, engine.apply(ANONYMIZE, ds, KEY)):
            fresh = dicomio.shallow_copy(dataset)
            meta = getattr(fresh, "file_meta", None)
            fresh_meta = FileMetaDataset(dict(meta._dict)) if meta is not None else None
            if fresh_meta is not None:
                fresh.file_meta = fresh_meta
            pid_raw = type(fresh._dict.get(0x00100020)) is RawDataElement
            ts_raw = fresh_meta is not None and type(fresh_meta._dict.get(0x00020010)) is RawDataElement
            got = (safe_str(fresh, "PatientID"), safe_transfer_syntax(fresh))
            if pid_raw:
                assert type(fresh._dict[0x00100020]) is RawDataElement, path  # not converted in place
            if ts_raw:
                assert type(fresh_meta._dict[0x00020010]) is RawDataElement, path
            assert got == (_pydicom_str(dataset, "PatientID"), _pydicom_syntax(dataset)), path
            compared += 1
            raw_pids += pid_raw
            raw_syntaxes += ts_raw
    assert compared > 100 and raw_pids > 100 and raw_syntaxes > 100, (compared, raw_pids, raw_syntaxes)


@pytest.mark.parametrize(
    "charset, raw, expected",
    [
        (None, b"PAT-0001 ", "PAT-0001"),
        (None, b" \0", ""),
        (None, b"", ""),
        (None, b"A\\B", "A\\B"),  # two values: their text, which Orthanc hashes for the ids
        (None, b"  887 ", "  887"),  # leading spaces count in Orthanc's ids
        ("ISO_IR 100", "Müller".encode("latin-1"), "Müller"),  # not ASCII: pydicom decodes
        ("ISO 2022 IR 87", b"\x1b$B;3ED\x1b(B", "山田"),  # escapes: pydicom decodes
        ("ISO_IR 192", "Ωmega".encode("utf-8"), "Ωmega"),
    ],
)
def test_patient_id_fast_path_edges(charset, raw: bytes, expected):
    from pydicom.dataelem import RawDataElement

    ds = pydicom.Dataset()
    if charset:
        ds._dict[0x00080005] = RawDataElement(pydicom.tag.Tag(0x00080005), "CS", len(charset), charset.encode(), 0, False, True)
    ds._dict[0x00100020] = RawDataElement(pydicom.tag.Tag(0x00100020), "LO", len(raw), raw, 0, False, True)
    assert safe_str(ds, "PatientID") == expected == _pydicom_str(ds, "PatientID")


def test_patient_id_with_a_sequence_vr_is_not_read_as_text():
    """A hostile PatientID encoded as SQ: pydicom's answer (not a str: None), not its bytes."""
    from pydicom.dataelem import RawDataElement

    ds = pydicom.Dataset()
    ds._dict[0x00100020] = RawDataElement(pydicom.tag.Tag(0x00100020), "SQ", 0, b"", 0, False, True)
    assert safe_str(ds, "PatientID") is None


def _deidentify_fn_outputs(cfg: RunConfig, elements: list[tuple[str, int]], release: Any = None) -> tuple[list, list]:
    """Drive ``DeidentifyFn`` as a runner does (setup, one bundle, teardown): the values it
    yields from ``process`` and from ``finish_bundle``, tags unwrapped. ``release`` (an
    event) is set just before ``finish_bundle``."""
    from apache_beam.pvalue import TaggedOutput

    from transforms.beam import DeidentifyFn

    fn = DeidentifyFn(cfg)
    fn.setup()
    fn.start_bundle()
    in_process, in_finish = [], []
    for element in elements:
        for out in fn.process(element):
            in_process.append((out.tag, out.value) if isinstance(out, TaggedOutput) else (None, out))
    if release is not None:
        release.set()
    for out in fn.finish_bundle() or ():
        in_finish.append((out.tag, out.value) if isinstance(out, TaggedOutput) else (None, out))
    fn.teardown()
    return in_process, in_finish


def test_deidentify_fn_emits_every_row_once_across_process_and_finish_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Files are hashed and published on the writer thread: rows of finished files come out of
    later ``process`` calls, the rest from ``finish_bundle`` (as windowed values, in the
    global window), and every input has exactly one audit row and, written, one crosswalk
    row, whichever call emitted it. The writer is held on the last two files until the
    bundle finishes, so both paths are taken on every run."""
    import threading

    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.windowed_value import WindowedValue

    from transforms import beam as tbeam
    from transforms.beam import CROSSWALK_TAG

    release = threading.Event()
    real_finish = tbeam.finish_file
    held: list[str] = []

    def finish_file(prepared):
        if prepared.row["source_uri"] in held:
            assert release.wait(30)
        return real_finish(prepared)

    monkeypatch.setattr(tbeam, "finish_file", finish_file)

    names = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm", "rtstruct.dcm", "SC_rgb_rle.dcm",
             "ExplVR_BigEnd.dcm", "waveform_ecg.dcm", "image_dfl.dcm"]
    inputs = [Path(pydicom.data.get_testdata_file(n)) for n in names]
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a DICOM file at all")
    elements = [(str(p), p.stat().st_size) for p in [*inputs, junk, inputs[0]]]  # CT twice: same output
    held.append(str(inputs[-1]))  # image_dfl.dcm: the one writer thread waits, the second CT queues behind
    cfg = RunConfig(plan=ANONYMIZE, output_root=str(tmp_path / "out"), run_id="r", key_id=KEY.key_id, key=KEY,
                    crosswalk=True)
    in_process, in_finish = _deidentify_fn_outputs(cfg, elements, release)

    finished_late = sorted(v.value["source_uri"] for tag, v in in_finish if tag is None)
    # (which others finish before the bundle ends depends on thread scheduling)
    assert str(inputs[-1]) in finished_late and str(inputs[0]) in finished_late
    for _, value in in_finish:
        assert isinstance(value, WindowedValue) and value.windows == (GlobalWindow(),)
    outputs = in_process + [(tag, value.value) for tag, value in in_finish]
    audit = [v for tag, v in outputs if tag is None]
    crosswalk = [v for tag, v in outputs if tag == CROSSWALK_TAG]
    assert sorted(r["source_uri"] for r in audit) == sorted(e[0] for e in elements)
    by_status = {}
    for row in audit:
        by_status.setdefault(row["status"], []).append(row)
    assert [r["reason"] for r in by_status["failed"]] == ["not_dicom"]
    assert len(by_status["written"]) == len(elements) - 1
    assert sorted(r["output_uri"] for r in crosswalk) == sorted(r["output_uri"] for r in by_status["written"])
    for row in by_status["written"]:
        data = Path(row["output_uri"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["output_sha256"]
        assert len(data) == row["bytes_out"]
    ct_rows = [r for r in audit if r["source_uri"] == str(inputs[0])]
    assert len(ct_rows) == 2 and ct_rows[0]["output_uri"] == ct_rows[1]["output_uri"]
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_deidentify_fn_bounds_the_files_waiting_for_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """With a writer that never finishes on its own, ``process`` stops taking files once
    ``_MAX_PENDING`` wait: it blocks on the oldest (here: finishes it inline) before going on."""
    from transforms import beam as tbeam

    finished: list[str] = []

    class Slow:
        def __init__(self, *args, **kwargs):
            pass

        def submit(self, fn, prepared):
            import concurrent.futures

            future = concurrent.futures.Future()

            def result(timeout=None):
                if not future.done():
                    finished.append(prepared.row["source_uri"])
                    future.set_result(fn(prepared))
                return concurrent.futures.Future.result(future)

            future.result = result  # type: ignore[method-assign]
            return future

        def shutdown(self, wait=True):
            pass

    monkeypatch.setattr(tbeam.concurrent.futures, "ThreadPoolExecutor", Slow)
    monkeypatch.setattr(tbeam.DeidentifyFn, "_MAX_PENDING", 3)
    cfg = RunConfig(plan=ANONYMIZE, output_root=str(tmp_path / "out"), run_id="r", key_id=KEY.key_id, key=KEY)
    fn = tbeam.DeidentifyFn(cfg)
    fn.setup()
    fn.start_bundle()
    for i in range(6):
        copy = tmp_path / f"in{i}.dcm"
        copy.write_bytes(CT.read_bytes())
        list(fn.process((str(copy), copy.stat().st_size)))
        assert len(fn._pending) == min(i + 1, 3)
    assert finished == [str(tmp_path / f"in{i}.dcm") for i in range(3)]
    assert len(list(fn.finish_bundle())) == 3
    assert len(finished) == 6


def test_deidentify_fns_of_one_process_share_a_memory_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Four DoFns on four threads (as a runner with several harness threads): the input bytes
    they hold, read or waiting for their writers, never exceed the shared budget; a file over
    the whole budget runs alone; every file gets its row and the budget ends empty."""
    from transforms import beam as tbeam

    limit = 300_000
    budget = tbeam.process_budget(limit)
    big = Path(pydicom.data.get_testdata_file("examples_overlay.dcm"))  # 321,700 bytes: over the budget
    names = ["CT_small.dcm", "MR_small.dcm", "liver_1frame.dcm", "examples_jpeg2k.dcm", "SC_rgb_jpeg_dcmd.dcm",
             "J2K_pixelrep_mismatch.dcm", "waveform_ecg.dcm", "examples_rgb_color.dcm"]  # fmt: skip
    sources = [Path(pydicom.data.get_testdata_file(n)) for n in names] + [big]
    used_seen: list[int] = []
    seen_by_big: list[int] = []
    real_prepare, real_finish = tbeam.prepare_file, tbeam.finish_file

    def prepare_file(path, size, *args, **kwargs):
        (seen_by_big if path.endswith("-big.dcm") else used_seen).append(budget.used)
        return real_prepare(path, size, *args, **kwargs)

    def finish_file(prepared):
        # A slow store, so files queue for the writers. Not a guess the test relies on: the
        # assertion that the budget was reached (max(used_seen) > limit // 2) fails if they did not.
        time.sleep(0.005)
        return real_finish(prepared)

    monkeypatch.setattr(tbeam, "prepare_file", prepare_file)
    monkeypatch.setattr(tbeam, "finish_file", finish_file)
    big_copy = tmp_path / "in" / "x-big.dcm"
    big_copy.parent.mkdir()
    big_copy.write_bytes(big.read_bytes())
    cfg = RunConfig(plan=ANONYMIZE, output_root=str(tmp_path / "out"), run_id="r", key_id=KEY.key_id, key=KEY,
                    memory_budget=limit)  # fmt: skip
    rows: list[list[dict]] = [[] for _ in range(4)]

    def worker(w: int) -> None:
        fn = tbeam.DeidentifyFn(cfg)
        fn.setup()
        try:
            for bundle in range(3):
                fn.start_bundle()
                outs = []
                for i, src in enumerate(sources):
                    # copies of the same files (the same outputs: written once, then found
                    # identical), the big one once
                    if src == big:
                        if (w, bundle) != (0, 1):
                            continue
                        path = big_copy
                    else:
                        path = tmp_path / "in" / f"{w}-{bundle}-{i}.dcm"
                        path.write_bytes(src.read_bytes())
                    outs += list(fn.process((str(path), path.stat().st_size)))
                outs += [o.value for o in fn.finish_bundle()]
                rows[w] += [o for o in outs if isinstance(o, dict)]
        finally:
            fn.teardown()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert sum(len(r) for r in rows) == 4 * 3 * len(names) + 1
    assert budget.used == 0
    assert len(used_seen) == 4 * 3 * len(names)
    assert limit // 2 < max(used_seen) <= limit  # the budget was the bound, and it was reached
    assert seen_by_big == [big.stat().st_size]  # the big file waited until it was alone
    assert budget.peak == big.stat().st_size


def test_a_transcode_holds_its_decoded_pixels_in_the_memory_budget(tmp_path: Path):
    """The budget counts input bytes; a Transcode decodes pixels beyond them (a compressed
    input decodes to many times its size): while it runs, the file holds its input plus three times its
    decoded size, then its input again until the output is written, then nothing."""
    from transforms import beam as tbeam
    from transforms.request import parse_anonymize

    source = Path(pydicom.data.get_testdata_file("SC_rgb_jpeg_dcmd.dcm"))  # JPEG, 100x100 RGB
    header = pydicom.dcmread(source, stop_before_pixels=True)
    decoded = header.Rows * header.Columns * header.SamplesPerPixel * header.BitsAllocated // 8
    budget = tbeam.MemoryBudget(1 << 30)
    seen: list[int] = []
    real_acquire = budget.acquire

    def acquire(n: int) -> None:
        real_acquire(n)
        seen.append(budget.used)

    budget.acquire = acquire  # type: ignore[method-assign]
    cfg = RunConfig(plan=parse_anonymize({"Transcode": "1.2.840.10008.1.2.5"}), output_root=str(tmp_path / "out"),
                    run_id="r", key_id=KEY.key_id, key=KEY)  # fmt: skip
    size = source.stat().st_size
    with tbeam.budget_hold(budget, size) as hold:
        prepared = tbeam.prepare_file(str(source), size, cfg, KEY)
        assert budget.used == hold.n == size  # (back to the input once the pixels are encoded)
    assert seen == [size, size + 3 * decoded] and budget.peak == size + 3 * decoded
    row, _ = tbeam.finish_file(prepared)
    hold.release()
    assert (row["status"], row["transfer_syntax_out"], budget.used) == ("written", "1.2.840.10008.1.2.5", 0)
    with tbeam.budget_hold(budget, size) as hold:  # without Transcode: the input only
        tbeam.prepare_file(str(source), size, dataclasses.replace(cfg, plan=parse_anonymize({})), KEY)
    hold.release()
    assert seen[2:] == [size] and budget.used == 0


def test_the_default_memory_budget_is_a_share_of_this_machine(monkeypatch: pytest.MonkeyPatch):
    from transforms import workers
    from transforms.beam import default_memory_budget

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget = default_memory_budget()
    assert 256 << 20 <= budget <= max(256 << 20, total // 2 // workers.usable_cpus())
    # shared by the CPUs the process may use (a container's quota), not the host's cores
    monkeypatch.setattr(workers, "usable_cpus", lambda: 1)
    one = default_memory_budget()
    monkeypatch.setattr(workers, "usable_cpus", lambda: 4)
    assert 256 << 20 <= one <= max(256 << 20, total // 2)
    assert default_memory_budget() == max(256 << 20, one // 4)


def test_memory_budget_serves_requests_in_arrival_order():
    """A file over the whole budget is not starved by smaller ones that would each fit: they
    queue behind it, it runs alone once the budget is empty, then they follow."""
    from transforms.beam import MemoryBudget

    budget = MemoryBudget(100)
    budget.acquire(60)  # a file in flight
    order: list[str] = []
    got_big = threading.Event()

    def big() -> None:
        budget.acquire(150)
        order.append("big")
        got_big.set()

    def small(name: str) -> None:
        budget.acquire(30)  # fits next to the 60 held, but arrived after the big one
        order.append(name)
        budget.release(30)

    t_big = threading.Thread(target=big)
    t_big.start()
    while budget._next_ticket < 2:  # the big request is queued
        time.sleep(0.001)
    smalls = [threading.Thread(target=small, args=(f"small{i}",)) for i in range(3)]
    for i, t in enumerate(smalls):
        t.start()
        while budget._next_ticket < 3 + i:
            time.sleep(0.001)
    # Nothing signals "still waiting": a short pause gives a wrong budget the chance to let a
    # thread through (a negative check; the waits above make the queue order deterministic).
    time.sleep(0.05)
    assert order == []  # all wait: the big one for the budget to empty, the small ones for their turn
    budget.release(60)
    assert got_big.wait(10)
    time.sleep(0.05)  # again a negative check: no small one may join the big one
    assert order == ["big"] and budget.used == 150  # alone
    budget.release(150)
    for t in [t_big, *smalls]:
        t.join(10)
    assert order[0] == "big" and sorted(order[1:]) == ["small0", "small1", "small2"]
    assert budget.used == 0 and budget.peak == 150


def test_the_gil_switch_interval_is_short_only_for_a_lone_deidentify_fn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """One DeidentifyFn in the process: 0.2 ms, so its writer thread gets the GIL back promptly.
    Several (a runner's DoFn threads): the interpreter's interval, restored."""
    import sys

    from transforms import beam as tbeam

    monkeypatch.setattr(tbeam, "_LIVE", {"fns": 0, "saved": None})  # other tests' DoFns stay set up
    cfg = RunConfig(plan=ANONYMIZE, output_root=str(tmp_path / "out"), run_id="r", key_id=KEY.key_id, key=KEY)
    before = sys.getswitchinterval()
    original = 0.005  # the interpreter's default (an earlier DoFn in this process may have lowered it)
    sys.setswitchinterval(original)
    first, second = tbeam.DeidentifyFn(cfg), tbeam.DeidentifyFn(cfg)
    seen = []
    try:
        first.setup()
        seen.append(sys.getswitchinterval())
        second.setup()
        seen.append(sys.getswitchinterval())
        second.teardown()
        seen.append(sys.getswitchinterval())
        second.teardown()  # twice: counted once
        seen.append(sys.getswitchinterval())
    finally:
        first.teardown()
        second.teardown()
    after = sys.getswitchinterval()
    sys.setswitchinterval(before)
    assert seen == pytest.approx([0.0002, original, 0.0002, 0.0002])
    assert after == pytest.approx(original)


@pytest.mark.parametrize("sop", ["1.2.3\n", "../../x", "1." * 32 + "1", ""])
def test_output_name_refuses_what_is_not_a_plain_uid(sop: str):
    from transforms.files import output_name

    with pytest.raises(InputError) as info:
        output_name("1.2", "1.2.3", sop)
    assert info.value.reason == "invalid_uid"
    assert output_name("1.2", "1.2.3", "1.2.3.4") == "1.2/1.2.3/1.2.3.4.dcm"


def test_a_remote_input_is_read_in_one_piece(monkeypatch: pytest.MonkeyPatch):
    """gs:// inputs were read in 8 MiB pieces and joined: the bytes were held twice (peak 2x on
    the emulator) and GCS served one request per piece. One read now asks for the whole object
    (and one byte more, so that a file grown past --max-bytes is still refused)."""
    from transforms import files

    asked: list[int] = []
    content = b"DICM" * 1000

    class Reader:
        def __init__(self) -> None:
            self.pos = 0

        def read(self, n: int) -> bytes:
            asked.append(n)
            piece = content[self.pos : self.pos + n]
            self.pos += len(piece)
            return piece

        def __enter__(self):
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(files.FileSystems, "open", staticmethod(lambda path, compression_type=None: Reader()))
    assert files.read_bounded("gs://archive/x.dcm", 10_000) == content
    assert asked == [10_001, 10_001 - len(content)]  # the whole, then the end of the object
    asked.clear()
    with pytest.raises(files.InputError, match="larger than --max-bytes"):
        files.read_bounded("gs://archive/x.dcm", 3_999)
    assert asked == [4_000]
