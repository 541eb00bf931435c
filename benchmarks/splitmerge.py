"""Split/merge benchmarks. Section ``group-by-study``: what grouping the index by study costs.

The split/merge pipeline's first pass reads every header and builds the study index. A split
filters entries file by file (no shuffle); a merge groups them by Orthanc study id
(``GroupByKey``) because a resource named by series or instance needs its whole study. This
section measures, on a generated archive (default 10,000 instances: 200 studies x 2 series x
25 instances, one patient per study, each a clone of one small CT with new UIDs):

- ``header loop``: plain Python, read every header (``stop_before_pixels``) - the floor;
- ``index, split``: the Beam index pass without grouping;
- ``index, merge``: the same with ``GroupByKey`` by study;
- ``GroupByKey only``: 10,000 index entries created in memory, keyed and grouped;
- ``plan``: ``plan_merge`` over the whole index (driver side);
- ``split``/``merge`` end to end: both passes, moving 25 / 50 instances out of 10,000.

Usage::

    python benchmarks/splitmerge.py [--instances 10000] [--workers 1 2] [--repeat 3] [--workdir DIR]

Each figure is the median of ``--repeat`` runs (seconds, and instances/s over all inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines import run as pipeline_run  # noqa: E402
from pipelines import splitmerge as psm  # noqa: E402
from transforms import splitmerge as sm  # noqa: E402
from transforms.dicomio import read_dataset, shallow_copy, write_dataset  # noqa: E402
from transforms.identity import Key  # noqa: E402

ROOT = "1.2.826.0.1.3680043.10.999"
SERIES_PER_STUDY = 2
INSTANCES_PER_SERIES = 25
KEY = Key.from_bytes(b"benchmark-key-not-secret-0123456")


def _template() -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = f"{ROOT}.0.0.0"
    ds.StudyInstanceUID = f"{ROOT}.0"
    ds.SeriesInstanceUID = f"{ROOT}.0.0"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Mark", "P0", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyDescription = "20240101", "120000", "A0", "bench"
    ds.ReferringPhysicianName, ds.StudyID = "Ref^Doc", "1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, 1
    ds.FrameOfReferenceUID = f"{ROOT}.9"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(64 * 64 * 2)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def generate(folder: Path, instances: int) -> list[Path]:
    """Clone one small CT ``instances`` times with new UIDs (and one patient per study)."""
    template = read_dataset(_template())
    per_study = SERIES_PER_STUDY * INSTANCES_PER_SERIES
    paths = []
    for n in range(instances):
        study, rest = divmod(n, per_study)
        series, number = divmod(rest, INSTANCES_PER_SERIES)
        ds = shallow_copy(template)  # unchanged elements are written as the template's bytes
        ds.PatientID = f"P{study}"
        ds.StudyInstanceUID = f"{ROOT}.{study}"
        ds.SeriesInstanceUID = f"{ROOT}.{study}.{series}"
        ds.SOPInstanceUID = f"{ROOT}.{study}.{series}.{number}"
        ds.InstanceNumber = number + 1
        path = folder / f"s{study:05d}" / f"{series}" / f"{number:03d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(write_dataset(ds))
        paths.append(path)
    return paths


def _options(workers: int) -> PipelineOptions:
    args = ["--runner=DirectRunner"]
    if workers > 1:
        args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    return pipeline_run.pipeline_options(args)


def _count_to(pcoll: beam.PCollection, prefix: str) -> None:
    pcoll | "Count" >> beam.combiners.Count.Globally() | "WriteCount" >> beam.io.WriteToText(prefix, shard_name_template="")


def _read_count(prefix: str) -> int:
    return int(Path(prefix).read_text().strip())


def index_pass(input_dir: Path, selector: psm.IndexSelector, workers: int, scratch: Path) -> int:
    """The Beam index pass alone; returns the number of entries it kept."""
    from transforms.beam import ExpandInput

    prefix = str(scratch / f"count-{time.monotonic_ns()}")
    p = pipeline_run.make_pipeline(_options(workers))
    entries = (
        p
        | "Input" >> beam.Create([str(input_dir)])
        | "ExpandInput" >> ExpandInput()
        | "BuildStudyIndex" >> psm.BuildStudyIndex(selector, 1 << 30)
    )
    _count_to(entries, prefix)
    p.run().wait_until_finish()
    return _read_count(prefix)


def group_only(entries: list[sm.IndexEntry], workers: int, scratch: Path) -> int:
    """Create the entries in memory, key by study, GroupByKey; returns the number of groups."""
    prefix = str(scratch / f"groups-{time.monotonic_ns()}")
    p = pipeline_run.make_pipeline(_options(workers))
    groups = (
        p
        | "Create" >> beam.Create(entries, reshuffle=False)
        | "KeyByStudy" >> beam.Map(lambda e: (e.study, e))
        | "GroupByStudy" >> beam.GroupByKey()
    )
    _count_to(groups, prefix)
    p.run().wait_until_finish()
    return _read_count(prefix)


def empty_pipeline(workers: int, scratch: Path) -> int:
    prefix = str(scratch / f"empty-{time.monotonic_ns()}")
    p = pipeline_run.make_pipeline(_options(workers))
    _count_to(p | beam.Create([1]), prefix)
    p.run().wait_until_finish()
    return _read_count(prefix)


def _median(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def group_by_study(instances: int, workers_list: list[int], repeat: int, workdir: Path) -> list[dict[str, Any]]:
    """The ``group-by-study`` section; returns one record per measurement."""
    input_dir = workdir / "in"
    start = time.perf_counter()
    paths = generate(input_dir, instances)
    print(f"generated {len(paths)} instances in {time.perf_counter() - start:.1f} s "
          f"({sum(p.stat().st_size for p in paths) / 1e6:.1f} MB) under {input_dir}", flush=True)  # fmt: skip
    scratch = workdir / "scratch"
    scratch.mkdir(exist_ok=True)
    results: list[dict[str, Any]] = []

    def record(name: str, workers: int, seconds: float, detail: str = "") -> None:
        results.append({"measure": name, "workers": workers, "seconds": round(seconds, 3),
                        "instances_per_s": round(instances / seconds) if seconds else None, "detail": detail})  # fmt: skip
        print(f"{name:<34} workers={workers}  {seconds:7.2f} s  {instances / seconds:8.0f} inst/s  {detail}", flush=True)

    seconds, entries = _median(
        lambda: [sm.index_entry(str(p), psm.read_header(str(p), p.stat().st_size, 1 << 30)) for p in paths], repeat
    )
    record("header loop (plain Python)", 1, seconds, f"{len(entries)} entries")
    first_study = f"{ROOT}.0"
    split_sel = psm.IndexSelector.for_split(sm.parse_split(first_study, {"Series": [f"{ROOT}.0.0"]}))
    merge_req = sm.parse_merge(first_study, {"Resources": [f"{ROOT}.1"]})
    merge_sel = psm.IndexSelector.for_merge(merge_req)
    for workers in workers_list:
        seconds, _ = _median(lambda: empty_pipeline(workers, scratch), repeat)
        record("empty pipeline (overhead)", workers, seconds)
        seconds, kept = _median(lambda: index_pass(input_dir, split_sel, workers, scratch), repeat)
        record("index, split (no shuffle)", workers, seconds, f"{kept} entries kept")
        seconds, kept = _median(lambda: index_pass(input_dir, merge_sel, workers, scratch), repeat)
        record("index, merge (GroupByKey study)", workers, seconds, f"{kept} entries kept")
        seconds, groups = _median(lambda: group_only(entries, workers, scratch), repeat)
        record("GroupByKey only (in-memory entries)", workers, seconds, f"{groups} groups")
    with_tags = [e._replace(study_tags=sm.copied_study_tags(read_dataset(Path(e.source).read_bytes())))
                 if e.study_uid == first_study else e for e in entries]  # fmt: skip
    seconds, plan = _median(lambda: sm.plan_merge(with_tags, merge_req, KEY), repeat)
    record("plan_merge over the index (driver)", 1, seconds, f"{plan.instances_count} moved")
    for workers in workers_list:
        for command, body in (("split", {"Series": [f"{ROOT}.0.0"]}), ("merge", {"Resources": [f"{ROOT}.1"]})):
            def run_cli(command: str = command, body: dict = body, workers: int = workers) -> int:
                tag = f"{command}-{workers}-{time.monotonic_ns()}"
                argv = [command, str(input_dir), str(workdir / tag), "--study", first_study, "--body", json.dumps(body),
                        "--audit", str(workdir / f"{tag}-audit"), "--quiet", "--runner=DirectRunner"]  # fmt: skip
                if workers > 1:
                    argv += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
                os.environ["DICOM_DEID_KEY"] = "benchmark-key-not-secret-0123456"
                from pipelines import cli

                return cli.main(argv)

            seconds, code = _median(run_cli, repeat)
            record(f"{command} end to end (2 passes)", workers, seconds, f"exit {code}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="keep the generated files here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="splitmerge-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        print("== group-by-study ==")
        results = group_by_study(args.instances, args.workers, args.repeat, workdir)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
