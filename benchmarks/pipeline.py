"""Pipeline throughput: ``dicom-deid anonymize`` against a plain Python copy of the same files.

Usage::

    python benchmarks/pipeline.py                      # quick: ~100 MB
    python benchmarks/pipeline.py --size-mb 1024       # the issue's ~1 GB
    python benchmarks/pipeline.py --size-mb 1024 --scaling 1000,10000 --json results.json

The shared samples (``../shared/dicom-samples``) are replicated until the corpus reaches
``--size-mb``: every replica gets its own Study/Series/SOP Instance UIDs (keyed on the replica
number), so no two inputs collide on an output name and every file is really written. Files
the pipeline cannot process (the README, a C-FIND query) are left out so that both sides move
the same bytes. Then, in the same run, on the same (page-cached) files:

- ``copy``: a plain Python loop reading each file and writing it to a new folder tree;
- ``dicom-deid``: the console command with defaults (DirectRunner, in-memory, one worker
  process per CPU: ``transforms.workers``), in a child process, and with ``--processes 0``
  (everything in Beam's process) beside it;
- optionally ``dicom-deid`` with ``--direct_running_mode multi_processing --direct_num_workers 2``;
- Beam's own floor: a copy-only Beam pipeline (``MatchAll | Reshuffle | ReadMatches | Map(write)``)
  with the same runner options (``--no-beam-copy`` skips it).

Reported: files/s, MB/s (input bytes), the ratio to the copy, the same two once the outputs
are on the disk (``durable``: the phase's time plus the ``os.sync()`` after it; a 1 GB corpus
fits under the kernel's dirty-page thresholds, so without it the copy measures writes into
memory, see ``benchmarks/core.py``), CPU seconds and files per
CPU-second (more robust than wall time when other work shares the machine, though not immune:
on these VMs another busy process also slows ours per instruction; for the multi-process runs
it sums every worker, so it shows cost, not speed-up), peak memory of the largest single
process (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` in a wrapper process, which covers
the command and the worker processes it waited for), the peak of the summed PSS of the whole
process tree (sampled every 0.2 s), and with ``--scaling`` how files/s changes from 1k to 10k
instances. Wall-clock times include process start-up (~2 s for Beam), as a user sees them.
With ``--repeat N`` every variant runs N times, interleaved (copy, dicom-deid, ..., copy,
...), and the table shows medians of wall and CPU time (``--json`` keeps every run).

Nothing is deleted between measured phases (every phase writes to a fresh folder; the work
folder goes at the very end) and ``os.sync()`` runs before each phase. Reason: on ext4
without a journal (these build machines), creating a file soon after many files were deleted
can cost ~1 ms instead of ~0.02 ms (the inode allocator skips inodes freed in the last 60 s,
300 s while their inode table block is dirty: ``recently_deleted`` in the kernel profile), so
deleting the copy's folder used to tax the dicom-deid run that followed it, which creates
more inodes (one folder per series). The benchmark probes the cost of creating a file before
it starts and warns when the filesystem is in that state (e.g. files deleted minutes ago).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transforms.workers import default_processes

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO.parent / "shared" / "dicom-samples"
SECRET = b"benchmark-key-not-secret-0123456789"
_SLOW_CREATE_S = 0.2e-3


def _usable_samples(samples: Path) -> list[tuple[Path, bytes]]:
    """Sample files the core reads and writes (so both sides of the comparison move them)."""
    from transforms import dicomio, engine, request
    from transforms.identity import Key

    plan, key = request.parse_anonymize({}), Key.from_bytes(SECRET)
    usable, sops = [], set()
    for path in sorted(p for p in samples.rglob("*") if p.is_file()):
        data = path.read_bytes()
        try:
            ds = dicomio.read_dataset(data)
            dicomio.write_dataset(engine.apply(plan, ds, key))
            sop = str(ds["SOPInstanceUID"].value)
        except Exception:  # noqa: BLE001 - not part of the corpus
            continue
        if sop in sops:
            continue  # the samples hold a few duplicate SOPInstanceUIDs: keep the first
        sops.add(sop)
        usable.append((path, data))
    return usable


def _replica_uid(uid: str, replica: int) -> str:
    digest = hashlib.sha256(f"{replica}|{uid}".encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _with_new_uids(data: bytes, replica: int) -> bytes:
    from io import BytesIO

    import pydicom

    ds = pydicom.dcmread(BytesIO(data), force=True)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, _replica_uid(str(ds[keyword].value), replica))
    if getattr(ds, "file_meta", None) is not None and "MediaStorageSOPInstanceUID" in ds.file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def replicate(samples: Path, target: Path, size_mb: float, max_files: int | None = None) -> tuple[int, int]:
    """Fill ``target`` with replicas of the samples; returns (files, bytes)."""
    import warnings

    # pydicom warns when it re-encodes a value it cannot represent (a Shift-JIS sample):
    # the replica is still valid for the benchmark, and the warning is noise.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    usable = _usable_samples(samples)
    if not usable:
        raise SystemExit(f"no usable DICOM files under {samples}")
    limit = size_mb * 1e6
    files = total = 0
    replica = 0
    while total < limit and (max_files is None or files < max_files):
        folder = target / f"r{replica:04d}"
        for path, data in usable:
            if total >= limit or (max_files is not None and files >= max_files):
                break
            if replica == 0:
                out = data
            else:
                try:
                    out = _with_new_uids(data, replica)
                except Exception:  # noqa: BLE001 - pydicom cannot re-encode this one: skip it
                    continue
            dest = folder / path.relative_to(samples)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(out)
            files += 1
            total += len(out)
        replica += 1
    return files, total


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def plain_copy(src: Path, dst: Path) -> tuple[float, float]:
    """Read every file and write it under ``dst``; returns (wall seconds, CPU seconds)."""
    cpu = _cpu_self()
    start = time.perf_counter()
    for dirpath, _, names in os.walk(src):
        out_dir = dst / Path(dirpath).relative_to(src)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                data = f.read()
            with open(out_dir / name, "wb") as f:
                f.write(data)
    return time.perf_counter() - start, _cpu_self() - cpu


#: Runs argv[1:] and reports on stderr its children's peak RSS (the largest single process)
#: and CPU, and the peak over time of the summed PSS of the command's whole process tree
#: (worker processes included; PSS shares each page among the processes that map it, so
#: fork-shared pages count once), sampled every 0.2 s (~1% of a CPU). A wrapper process, so
#: RUSAGE_CHILDREN holds this run's figures only, not the maximum over earlier runs.
_MEASURING_WRAPPER = """
import os, resource, subprocess, sys, time

def tree(root):
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found

def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0

child = subprocess.Popen(sys.argv[1:])
tree_peak = 0
while child.poll() is None:
    if os.path.exists("/proc/self/smaps_rollup"):
        tree_peak = max(tree_peak, sum(pss_kib(pid) for pid in tree(child.pid)))
    time.sleep(0.2)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print("PEAK_KIB", r.ru_maxrss, r.ru_utime + r.ru_stime, tree_peak, file=sys.stderr)
sys.exit(child.returncode)
"""


def _run_measured(argv: list[str], ok: tuple[int, ...], what: str) -> tuple[float, float, tuple[int, int], str]:
    """Run ``argv`` under the wrapper; returns (seconds, CPU seconds, (peak RSS of one process,
    peak PSS of the process tree) in KiB, stdout)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURING_WRAPPER, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in ok:
        raise SystemExit(f"{what} failed ({done.returncode}): {done.stderr[-2000:]}")
    _, peak, cpu, tree = done.stderr.strip().splitlines()[-1].split()
    return seconds, float(cpu), (int(peak), int(tree)), done.stdout


def run_cli(src: Path, dst: Path, key: Path, extra: list[str]) -> tuple[float, float, tuple[int, int], dict]:
    """Run the console command; returns (seconds, CPU seconds, peaks in KiB, summary)."""
    exe = Path(sys.executable).with_name("dicom-deid")
    argv = [str(exe), "anonymize", str(src), str(dst), "--key-file", str(key), "--no-progress", *extra]
    seconds, cpu, peak, stdout = _run_measured(argv, (0, 3), "dicom-deid")
    return seconds, cpu, peak, json.loads(stdout)


def beam_copy(src: str, dst: str, beam_args: list[str]) -> None:
    """Beam's floor for this job: a copy-only pipeline (match, read, write each file under
    ``dst``), with the same runner and worker options as the dicom-deid variant it sits beside."""
    import apache_beam as beam
    from apache_beam.io import fileio
    from apache_beam.options.pipeline_options import PipelineOptions

    def write(readable: fileio.ReadableFile) -> None:
        path = readable.metadata.path
        out = os.path.join(dst, os.path.relpath(path, src))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "wb") as f:
            f.write(readable.read())

    options = PipelineOptions(["--runner", "DirectRunner", *beam_args])
    with beam.Pipeline(options=options) as pipeline:
        (
            pipeline
            | beam.Create([os.path.join(src, "**")])
            | fileio.MatchAll()
            | beam.Reshuffle()
            | fileio.ReadMatches()
            | beam.Map(write)
        )


def run_beam_copy(src: Path, dst: Path, extra: list[str]) -> tuple[float, float, tuple[int, int]]:
    """``beam_copy`` in a child process, measured as ``run_cli`` measures the command."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--beam-copy-child", str(src), str(dst), *extra]
    seconds, cpu, peak, _ = _run_measured(argv, (0,), "Beam copy")
    return seconds, cpu, peak


def _row(
    name: str,
    files: int,
    nbytes: int,
    seconds: float,
    cpu: float,
    baseline: tuple[float, float],
    peak_kib: int | None,
    tree_kib: int | None = None,
) -> dict:
    return {
        "what": name,
        "files": files,
        "MB": round(nbytes / 1e6, 1),
        "seconds": round(seconds, 2),
        "files_per_s": round(files / seconds, 1),
        "MB_per_s": round(nbytes / 1e6 / seconds, 1),
        "ratio_to_copy": round((files / seconds) / baseline[0], 3),
        "cpu_seconds": round(cpu, 2),
        "files_per_cpu_s": round(files / cpu, 1),
        "cpu_ratio_to_copy": round((files / cpu) / baseline[1], 3),
        "peak_rss_MiB": None if peak_kib is None else round(peak_kib / 1024, 1),
        "peak_tree_pss_MiB": None if not tree_kib else round(tree_kib / 1024, 1),
    }


def create_probe(folder: Path, count: int = 300) -> float:
    """Median seconds to create (and write a byte to) one new file in a fresh sub-folder of
    ``folder``; the probe's files are left in place (deleting them would slow the next phase)."""
    probe = folder / f"probe-{time.time_ns()}"
    probe.mkdir(parents=True)
    times = []
    for i in range(count):
        start = time.perf_counter()
        with open(probe / f"{i}.bin", "wb") as f:
            f.write(b"x")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


BEAM_COPY = "Beam copy-only pipeline"


def measure(
    src: Path, files: int, nbytes: int, work: Path, key: Path, multi: bool, label: str = "", repeat: int = 1,
    beam_floor: bool = True,
) -> list[dict]:
    """Copy and dicom-deid variants, ``repeat`` times each, interleaved; medians per variant.

    Every phase writes to its own new folder under ``work`` and nothing is deleted here (see
    the module docstring): the caller removes ``work`` when all measurements are done.
    """
    multi_args = ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]
    processes = default_processes()
    variants: list[tuple[str, list[str] | None]] = [
        ("plain Python copy", None),
        (f"dicom-deid anonymize (defaults: in-memory, {processes} processes)", []),
    ]
    if processes:
        variants.append(("dicom-deid anonymize (in-memory, --processes 0)", ["--processes", "0"]))
    if beam_floor:
        variants.append((BEAM_COPY + " (in-memory)", []))
    if multi:
        variants.append(("dicom-deid anonymize (multi_processing, 2 workers)", multi_args))
        if beam_floor:
            variants.append((BEAM_COPY + " (multi_processing, 2 workers)", multi_args))
    tag = label.strip(" []").replace(" ", "-")
    samples: dict[str, list[tuple[float, float, int | None, float]]] = {name: [] for name, _ in variants}
    for r in range(repeat):
        for i, (name, extra) in enumerate(variants):
            out = work / f"out{'-' + tag if tag else ''}-{r}-{i}"
            os.sync()  # the previous phase's dirty pages are not this phase's cost
            peak = None
            if extra is None:
                seconds, cpu = plain_copy(src, out)
            elif name.startswith(BEAM_COPY):
                seconds, cpu, peak = run_beam_copy(src, out, extra)
            else:
                seconds, cpu, peak, summary = run_cli(src, out, key, extra)
                written = summary["Statuses"]["written"]
                if written != files:
                    print(f"warning: {name}: {written} of {files} written ({summary['Reasons']})", file=sys.stderr)
            synced = time.perf_counter()
            os.sync()  # durable: until this phase's outputs are on the disk
            samples[name].append((seconds, cpu, peak, seconds + time.perf_counter() - synced))
    copy_runs = samples["plain Python copy"]
    baseline = (files / statistics.median(r[0] for r in copy_runs), files / statistics.median(r[1] for r in copy_runs))
    durable_baseline = files / statistics.median(r[3] for r in copy_runs)
    rows = []
    for name, runs in samples.items():
        seconds = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        peak = max((r[2][0] for r in runs if r[2] is not None), default=None)
        tree = max((r[2][1] for r in runs if r[2] is not None), default=None)
        row = _row(name + label, files, nbytes, seconds, cpu, baseline, peak, tree)
        durable = statistics.median(r[3] for r in runs)
        row["durable_seconds"] = round(durable, 2)
        row["durable_files_per_s"] = round(files / durable, 1)
        row["durable_ratio_to_copy"] = round(files / durable / durable_baseline, 3)
        row["runs"] = len(runs)
        row["seconds_all"] = [round(r[0], 2) for r in runs]
        row["cpu_seconds_all"] = [round(r[1], 2) for r in runs]
        row["durable_seconds_all"] = [round(r[3], 2) for r in runs]
        rows.append(row)
    return rows


def _print(rows: list[dict]) -> None:
    header = (
        f"{'what':<62} {'files':>6} {'MB':>7} {'s':>7} {'files/s':>8} {'MB/s':>7} {'ratio':>6} "
        f"{'CPU s':>7} {'files/CPU-s':>11} {'CPU ratio':>9} {'peak MiB':>9} {'tree MiB':>9} "
        f"{'durable files/s':>15} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = "" if r["peak_rss_MiB"] is None else f"{r['peak_rss_MiB']:.0f}"
        tree = "" if r.get("peak_tree_pss_MiB") is None else f"{r['peak_tree_pss_MiB']:.0f}"
        print(
            f"{r['what']:<62} {r['files']:>6} {r['MB']:>7.1f} {r['seconds']:>7.2f} {r['files_per_s']:>8.1f} "
            f"{r['MB_per_s']:>7.1f} {r['ratio_to_copy']:>6.2f} {r['cpu_seconds']:>7.2f} {r['files_per_cpu_s']:>11.1f} "
            f"{r['cpu_ratio_to_copy']:>9.2f} {peak:>9} {tree:>9} {r['durable_files_per_s']:>15.1f} {r['durable_ratio_to_copy']:>6.2f}"
        )
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mb", type=float, default=100, help="corpus size (default 100; the issue's figure: 1024)")
    parser.add_argument("--samples", type=Path, default=SAMPLES)
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary folder, removed at the end; a given one keeps every output)")
    parser.add_argument("--no-multi", action="store_true", help="skip the multi_processing run")
    parser.add_argument("--scaling", help="comma-separated instance counts, e.g. 1000,10000")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant, interleaved; medians reported (default 1)")
    parser.add_argument("--no-beam-copy", action="store_true", help="skip the Beam copy-only pipeline (Beam's own floor)")
    parser.add_argument("--beam-copy-child", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args, beam_args = parser.parse_known_args(argv)
    if args.beam_copy_child:
        beam_copy(*args.beam_copy_child, beam_args)
        return 0
    if beam_args:
        parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not args.samples.is_dir():
        print(f"samples not found at {args.samples}", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="dicom-deid-bench-"))
    key = work / "bench.key"
    work.mkdir(parents=True, exist_ok=True)
    key.write_bytes(SECRET)
    rows: list[dict] = []
    try:
        corpus = work / "corpus"
        start = time.perf_counter()
        files, nbytes = replicate(args.samples, corpus, args.size_mb)
        print(f"corpus: {files} files, {nbytes / 1e6:.1f} MB (built in {time.perf_counter() - start:.1f} s)", file=sys.stderr)
        os.sync()
        probe = create_probe(work)
        print(f"file creation probe: {probe * 1e3:.3f} ms per new file", file=sys.stderr)
        if probe > _SLOW_CREATE_S:
            print(
                "warning: creating a file costs over 0.2 ms here: the filesystem is probably still "
                "skipping recently freed inodes (ext4 without a journal, many files deleted in the "
                "last ~5 minutes); every variant pays it per created file and folder, dicom-deid "
                "more (one folder per series). Wait a few minutes and rerun for representative figures.",
                file=sys.stderr,
            )
        rows += measure(corpus, files, nbytes, work, key, not args.no_multi, repeat=args.repeat, beam_floor=not args.no_beam_copy)
        _print(rows)  # partial results first: the scaling runs take a while
        for count in [int(c) for c in args.scaling.split(",")] if args.scaling else []:
            corpus = work / f"corpus-{count}"
            files, nbytes = replicate(args.samples, corpus, float("inf"), max_files=count)
            print(f"scaling corpus: {files} files, {nbytes / 1e6:.1f} MB", file=sys.stderr)
            rows += measure(corpus, files, nbytes, work, key, False, label=f" [{count} instances]", repeat=args.repeat, beam_floor=not args.no_beam_copy)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print()
    _print(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
