"""Core engine throughput against a plain Python file copy, side by side (one process).

The shared samples (``../shared/dicom-samples/**/*.dcm`` that the project reader accepts) are
replicated into a temporary folder until it holds ``--files`` files (or ``--size-mb``
megabytes). Each mode reads every file and writes one output file, three runs each, warm
cache; the median is reported:

- ``copy``: plain Python ``read_bytes`` + one write of those bytes (the baseline, ratio 1.00);
- ``read+write``: ``dicomio.read_dataset`` + ``dicomio.write_parts`` of the unchanged dataset;
- ``anonymize``: read + ``engine.apply`` with a default ``/anonymize`` body (2023b) + write;
- ``modify``: read + ``engine.apply`` with a small ``/modify`` body + write.

Two throughputs per mode. ``files/s`` stops the clock when the last file is written, i.e.
handed to the page cache; ``durable files/s`` also includes an ``os.sync()``, so it ends when
the outputs are on the disk. A 1 GB corpus fits under the kernel's dirty-page thresholds on
these machines (background write-back starts at 10% of available memory, ~2.3 GB), so nothing
reaches the disk while a mode runs: the first figure measures copies into memory, the second
adds the whole write-back at the end, with no overlap with the computation (a dataset-scale
run, writing far more than the page cache holds, would overlap them).

Usage::

    python benchmarks/core.py [--files 1000 | --size-mb 1024] [--runs 3] [--profile] [--phases]

``--phases`` adds one anonymize pass timed step by step (CPU time per file: reading the file,
parsing, anonymizing, encoding, SHA-256 of the output as the pipeline computes it, writing),
the breakdown the README quotes.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import _SLOW_CREATE_S, create_probe  # noqa: E402  (benchmarks/pipeline.py)
from transforms import dicomio  # noqa: E402
from transforms.engine import apply  # noqa: E402
from transforms.errors import DeidError  # noqa: E402
from transforms.identity import Key  # noqa: E402
from transforms.request import parse_anonymize, parse_modify  # noqa: E402

SAMPLES = REPO.parent / "shared" / "dicom-samples"
MODIFY_BODY = {"Replace": {"PatientName": "Bench^Mark", "InstitutionName": "Bench"},
               "Remove": ["StationName"], "RemovePrivateTags": True}


def usable_samples(root: Path) -> list[tuple[Path, bytes]]:
    """Sample files the reader and the default anonymization both accept."""
    import warnings

    # pydicom warns while decoding a Shift-JIS name for reading (its own round trip of the
    # value; the bytes we write are the original ones): noise here, silenced by the command.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    plan = parse_anonymize({})
    key = Key.from_bytes(b"benchmark-key-0123456789")
    found = []
    for path in sorted(root.glob("**/*.dcm")):
        data = path.read_bytes()
        try:
            dicomio.write_dataset(apply(plan, dicomio.read_dataset(data), key))
        except DeidError:
            continue
        found.append((path, data))
    return found


def replicate(samples: list[tuple[Path, bytes]], folder: Path, files: int | None,
              size_mb: float | None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    total = 0
    limit = size_mb * 1024 * 1024 if size_mb else None
    index = 0
    while (limit is None and len(paths) < (files or 1000)) or (limit is not None and total < limit):
        _, data = samples[index % len(samples)]
        path = folder / f"{index:06d}.dcm"
        path.write_bytes(data)
        paths.append(path)
        total += len(data)
        index += 1
    return paths


def _copy(data: bytes) -> list[bytes]:
    return [data]


def _read_write(data: bytes) -> list:
    return dicomio.write_parts(dicomio.read_dataset(data))


def _engine(plan, key: Key) -> Callable[[bytes], list]:
    def run(data: bytes) -> list:
        return dicomio.write_parts(apply(plan, dicomio.read_dataset(data), key))
    return run


def _write(path: Path, parts: list) -> None:
    """Every mode writes the same way: ``dicomio.write_all`` (one ``writev``) of its buffers,
    which for the copy is the one buffer it read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        dicomio.write_all(fd, parts)
    finally:
        os.close(fd)


def time_mode(paths: list[Path], out: Path,
              work: Callable[[bytes], list]) -> tuple[float, float, float, float, float]:
    """(wall, CPU, user CPU, system CPU, durable wall) seconds to read each input, transform
    it and write it under ``out``; the durable wall time also includes the ``os.sync()`` that
    puts the outputs on the disk (the caller syncs before, so that is this mode's own data).

    CPU time (user + system of this process) is reported beside wall time because on a
    shared machine wall time mostly measures the other processes. User and system time are
    also given apart: system time (page cache, dirty-page writeback throttling) varies a lot
    between runs, user time is what the Python code costs.
    """
    out.mkdir(parents=True)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        _write(out / path.name, work(path.read_bytes()))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_SELF)
    os.sync()
    durable = time.perf_counter() - start
    return wall, cpu, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, durable


def time_phases(paths: list[Path], out: Path, plan, key: Key) -> dict[str, float]:
    """CPU seconds of each step of read + anonymize + write over ``paths``, summed."""
    out.mkdir(parents=True)
    clock = time.process_time
    totals = dict.fromkeys(("read", "parse", "anonymize", "encode", "sha256", "write"), 0.0)
    for path in paths:
        t0 = clock()
        data = path.read_bytes()
        t1 = clock()
        ds = dicomio.read_dataset(data)
        t2 = clock()
        new = apply(plan, ds, key)
        t3 = clock()
        parts = dicomio.write_parts(new)
        t4 = clock()
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        t5 = clock()
        _write(out / path.name, parts)
        t6 = clock()
        for name, start, end in (("read", t0, t1), ("parse", t1, t2), ("anonymize", t2, t3),
                                 ("encode", t3, t4), ("sha256", t4, t5), ("write", t5, t6)):
            totals[name] += end - start
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000, help="number of files (default 1000)")
    parser.add_argument("--size-mb", type=float, default=None, help="replicate to this many MB instead")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--samples", type=Path, default=SAMPLES)
    parser.add_argument("--profile", action="store_true", help="cProfile one anonymize pass")
    parser.add_argument("--phases", action="store_true", help="CPU time per step of one anonymize pass")
    args = parser.parse_args(argv)

    if not args.samples.is_dir():
        print(f"samples not found: {args.samples}", file=sys.stderr)
        return 2
    samples = usable_samples(args.samples)
    key = Key.from_bytes(b"benchmark-key-0123456789")
    modes: dict[str, Callable[[bytes], list]] = {
        "copy": _copy,
        "read+write": _read_write,
        "anonymize": _engine(parse_anonymize({}), key),
        "modify": _engine(parse_modify(MODIFY_BODY), key),
    }
    with tempfile.TemporaryDirectory(prefix="dicom-deid-bench-") as tmp:
        tmp_path = Path(tmp)
        paths = replicate(samples, tmp_path / "in", args.files, args.size_mb)
        size = sum(p.stat().st_size for p in paths)
        print(f"{len(samples)} distinct sample files replicated to {len(paths)} files, "
              f"{size / 1e6:.1f} MB; {args.runs} runs each, median")
        for path in paths:  # warm the page cache
            path.read_bytes()
        probe = create_probe(tmp_path)
        print(f"file creation probe: {probe * 1e3:.3f} ms per new file")
        if probe > _SLOW_CREATE_S:
            print("warning: creating files is slow on this filesystem right now (files deleted in the last "
                  "minutes?): every mode pays it, which flatters the ratios; rerun in a few minutes",
                  file=sys.stderr)
        # Modes are interleaved run by run, each starting after os.sync(): otherwise the mode
        # timed first (copy) writes into a clean page cache and every later mode pays the
        # write-back of the gigabytes written before it (system time x5 in a measured run).
        # Every phase writes into a fresh folder and nothing is deleted before the end: on ext4
        # without a journal (these machines), creating files soon after many were deleted costs
        # ~1 ms each instead of ~0.02 ms (see benchmarks/pipeline.py), which inflated every
        # mode's system time, the copy's most of all in relative terms.
        samples_by_mode: dict[str, list[tuple[float, ...]]] = {n: [] for n in modes}
        names = list(modes)
        for run in range(args.runs):
            # The order rotates from run to run: a phase late in a run finds the page cache full
            # of the earlier phases' outputs and pays for reclaiming it (system time up to 2.5x
            # the first phase's in a measured run).
            for name in names[run % len(names):] + names[: run % len(names)]:
                work = modes[name]
                os.sync()
                out = tmp_path / f"out-{run}-{name.replace('+', '-')}"
                samples_by_mode[name].append(time_mode(paths, out, work))
        results: dict[str, tuple[float, ...]] = {
            name: tuple(statistics.median(t[i] for t in times) for i in range(5))
            for name, times in samples_by_mode.items()
        }
        base_wall, base_cpu = results["copy"][:2]
        base_durable = results["copy"][4]
        print(f"{'mode':<12}{'files/s':>10}{'MB/s':>10}{'vs copy':>10}"
              f"{'CPU files/s':>14}{'CPU vs copy':>13}{'user us/file':>14}{'sys us/file':>13}"
              f"{'durable files/s':>17}{'vs copy':>9}")
        for name, (wall, cpu, user, system, durable) in results.items():
            print(f"{name:<12}{len(paths) / wall:>10.0f}{size / 1e6 / wall:>10.1f}"
                  f"{base_wall / wall:>10.2f}{len(paths) / cpu:>14.0f}{base_cpu / cpu:>13.2f}"
                  f"{user / len(paths) * 1e6:>14.0f}{system / len(paths) * 1e6:>13.0f}"
                  f"{len(paths) / durable:>17.0f}{base_durable / durable:>9.2f}")
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.phases:
            os.sync()
            phases = time_phases(paths, tmp_path / "out-phases", parse_anonymize({}), key)
            print("anonymize pass, CPU time per file: " + ", ".join(
                f"{name} {seconds / len(paths) * 1e6:.0f} us" for name, seconds in phases.items())
                + f"; total {sum(phases.values()) / len(paths) * 1e6:.0f} us")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            time_mode(paths, tmp_path / "out-profile", modes["anonymize"])
            profiler.disable()
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(30)
            print(stream.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
