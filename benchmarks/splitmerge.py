"""Split/merge benchmarks. Section ``group-by-study``: what grouping the index by study costs.

The split/merge pipeline's first pass reads every header and builds the study index. A split
filters entries file by file (no shuffle); a merge groups them by Orthanc study id
(``GroupByKey``) because a resource named by series or instance needs its whole study. This
section measures, on a generated archive (default 10,000 instances: 200 studies x 2 series x
25 instances, one patient per study, each a clone of one small CT with new UIDs):

- ``plain file copy``: ``read_bytes`` + ``write_bytes`` of every input file into a scratch
  folder, the baseline of the ``vs copy`` column (the copy's wall time over the measure's);
- ``header loop``: plain Python, read every header (``read_header``: up to the pixel data) and
  make its index entry - the floor;
- ``index, split``: the Beam index pass without grouping;
- ``index, merge``: the same with ``GroupByKey`` by study;
- ``in-memory entries, keyed [+ GroupByKey]``: 10,000 index entries created in memory and
  keyed by study, without and with the grouping: the difference is the shuffle alone;
- ``plan``: ``plan_merge`` over the whole index (driver side);
- ``split``/``merge`` end to end: both passes, moving 25 / 50 instances out of 10,000.

Usage::

    python benchmarks/splitmerge.py [--instances 10000] [--workers 1 2] [--repeat 3] [--workdir DIR]

Each figure is the median of ``--repeat`` runs: wall seconds (and instances/s over all inputs)
and CPU seconds of this process plus its worker processes, with the 1-minute load average.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
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
from transforms import splitmerge_files as smf  # noqa: E402
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


def index_pass(input_dir: Path, selector: smf.IndexSelector, workers: int, scratch: Path) -> int:
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


def group_only(entries: list[sm.IndexEntry], workers: int, scratch: Path, *, group: bool) -> int:
    """Create the entries in memory and key them by study, then (``group``) GroupByKey.

    Returns the number of elements (entries, or groups) at the end.
    """
    prefix = str(scratch / f"groups-{time.monotonic_ns()}")
    p = pipeline_run.make_pipeline(_options(workers))
    keyed = p | "Create" >> beam.Create(entries, reshuffle=False) | "KeyByStudy" >> beam.Map(lambda e: (e.study, e))
    _count_to(keyed | "GroupByStudy" >> beam.GroupByKey() if group else keyed, prefix)
    p.run().wait_until_finish()
    return _read_count(prefix)


def empty_pipeline(workers: int, scratch: Path) -> int:
    prefix = str(scratch / f"empty-{time.monotonic_ns()}")
    p = pipeline_run.make_pipeline(_options(workers))
    _count_to(p | beam.Create([1]), prefix)
    p.run().wait_until_finish()
    return _read_count(prefix)


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (multi_processing workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _median(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """Median wall and CPU seconds of ``repeat`` calls, and the last result.

    CPU time is the steadier figure on a shared machine: other processes' load stretches
    wall time but not the CPU this run needs.
    """
    walls, cpus, result = [], [], None
    for _ in range(repeat):
        start, cpu = time.perf_counter(), _cpu()
        result = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(_cpu() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


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

    copy_wall = 0.0

    def record(name: str, workers: int, timing: tuple[float, float, Any], detail: str = "") -> None:
        wall, cpu, _ = timing
        vs_copy = copy_wall / wall if wall else 0.0
        results.append({"measure": name, "workers": workers, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                        "instances_per_wall_s": round(instances / wall), "vs_copy": round(vs_copy, 4),
                        "load": os.getloadavg()[0], "detail": detail})  # fmt: skip
        print(f"{name:<38} workers={workers}  wall {wall:6.2f} s ({instances / wall:6.0f} inst/s, "
              f"{vs_copy:5.2f} of the copy)  cpu {cpu:6.2f} s  load {os.getloadavg()[0]:.1f}  {detail}",
              flush=True)  # fmt: skip

    def copy_all() -> int:
        target = scratch / "copy"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        for n, path in enumerate(paths):
            (target / f"{n:06d}.dcm").write_bytes(path.read_bytes())
        return len(paths)

    timing = _median(copy_all, repeat)
    copy_wall = timing[0]
    record("plain file copy (baseline)", 1, timing, f"{timing[2]} files")

    timing = _median(
        lambda: [sm.index_entry(str(p), smf.read_header(str(p), p.stat().st_size, 1 << 30)) for p in paths], repeat
    )
    entries = timing[2]
    record("header loop (plain Python)", 1, timing, f"{len(entries)} entries")
    first_study = f"{ROOT}.0"
    split_sel = smf.IndexSelector.for_split(sm.parse_split(first_study, {"Series": [f"{ROOT}.0.0"]}))
    merge_req = sm.parse_merge(first_study, {"Resources": [f"{ROOT}.1"]})
    merge_sel = smf.IndexSelector.for_merge(merge_req)
    for workers in workers_list:
        record("empty pipeline (overhead)", workers, _median(lambda: empty_pipeline(workers, scratch), repeat))
        timing = _median(lambda: index_pass(input_dir, split_sel, workers, scratch), repeat)
        record("index, split (no shuffle)", workers, timing, f"{timing[2]} entries kept")
        timing = _median(lambda: index_pass(input_dir, merge_sel, workers, scratch), repeat)
        record("index, merge (GroupByKey by study)", workers, timing, f"{timing[2]} entries kept")
        timing = _median(lambda: group_only(entries, workers, scratch, group=False), repeat)
        record("in-memory entries, keyed", workers, timing, f"{timing[2]} elements")
        timing = _median(lambda: group_only(entries, workers, scratch, group=True), repeat)
        record("in-memory entries, keyed + GroupByKey", workers, timing, f"{timing[2]} groups")
    with_tags = [e._replace(study_tags=sm.copied_study_tags(read_dataset(Path(e.source).read_bytes())))
                 if e.study_uid == first_study else e for e in entries]  # fmt: skip
    timing = _median(lambda: sm.plan_merge(with_tags, merge_req, KEY), repeat)
    record("plan_merge over the index (driver)", 1, timing, f"{len(timing[2].moves)} moved")
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

            timing = _median(run_cli, repeat)
            record(f"{command} end to end (2 passes)", workers, timing, f"exit {timing[2]}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="keep the generated files here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    # Beam's multi_processing workers log two warnings each per pipeline: noise between the rows
    logging.getLogger("apache_beam").setLevel(logging.ERROR)
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
