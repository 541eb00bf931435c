"""Transcode benchmark: the throughput cost of each target transfer syntax.

For every file of a sample folder (default ``../shared/dicom-samples``, every file that
``read_dataset`` accepts; files are loaded into memory first, so disk I/O is not measured), one
process runs

- ``copy``: a plain Python copy of the same files (``read_bytes`` + ``write_bytes`` into a
  temporary folder), the baseline of the ``vs copy`` column (wall-clock throughput over the
  copy's, measured in the same run);
- ``none``: ``read_dataset`` + ``write_dataset`` - the floor every target is compared with
  (``vs none``, CPU throughput);
- each target: ``read_dataset`` + ``transcode`` + ``write_dataset``, with the round-trip
  verification on (the default) and, with ``--no-verify-too``, off as well.

Files a target refuses (CannotTranscode: 1-bit, signed JPEG lossy, ...) count as processed:
the figure is what a pipeline over that folder would see. ``out/in`` is the output bytes over the
input bytes of the files written.

Usage::

    python benchmarks/transcode.py [--samples DIR] [--targets UID ...] [--repeat 3]
        [--no-verify-too] [--images-only] [--sources all|native|encapsulated] [--json FILE]

Each figure is the median of ``--repeat`` passes over all files. ``files/s`` divides by the
process's CPU time (every codec used runs on one thread), so other load on the machine does not
distort it; ``wall f/s`` is the same over wall-clock time, and ``vs copy`` divides it by the
copy's wall-clock throughput (the copy does file I/O, the other rows do not: the ratio is what
a target costs against merely copying the folder).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transforms import transcode as tc  # noqa: E402
from transforms.dicomio import read_dataset, write_dataset  # noqa: E402
from transforms.errors import CannotTranscode, DeidError  # noqa: E402

DEFAULT_SAMPLES = REPO.parent / "shared" / "dicom-samples"


def load(
    folder: Path, images_only: bool, sources: str = "all", per_syntax: int = 0
) -> list[tuple[Path, bytes]]:
    """Every readable DICOM file under ``folder``; with pixel data only (``images_only``);
    ``sources`` ``native`` / ``encapsulated`` keeps the files stored uncompressed / compressed;
    ``per_syntax`` keeps at most that many files of each source transfer syntax (in path order).
    Returns (path, bytes) pairs.
    """
    files = []
    seen: dict[str, int] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        try:
            ds = read_dataset(data)
        except DeidError:
            continue
        if images_only and "PixelData" not in ds:
            continue
        syntax = tc.source_syntax(ds)
        native = syntax in tc.NATIVE
        if (sources == "native" and not native) or (sources == "encapsulated" and native):
            continue
        if per_syntax and seen.get(syntax, 0) >= per_syntax:
            continue
        seen[syntax] = seen.get(syntax, 0) + 1
        files.append((path, data))
    return files


def copy_pass(paths: list[Path], into: Path) -> dict[str, Any]:
    """The plain file copy of ``paths`` into the folder ``into`` (emptied first)."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    start, cpu = time.perf_counter(), time.process_time()
    size = 0
    for n, path in enumerate(paths):
        data = path.read_bytes()
        (into / f"{n:06d}.dcm").write_bytes(data)
        size += len(data)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu": cpu, "ok": len(paths), "refused": 0, "bytes_in": size, "bytes_out": size}


def one_pass(files: list[bytes], target: str | None, verify: bool) -> dict[str, Any]:
    ok = refused = bytes_in = bytes_out = 0
    start, cpu = time.perf_counter(), time.process_time()
    for data in files:
        ds = read_dataset(data)
        if target is not None:
            try:
                ds = tc.transcode(ds, target, verify=verify)
            except CannotTranscode:
                refused += 1
                continue
        out = write_dataset(ds)
        ok += 1
        bytes_in += len(data)
        bytes_out += len(out)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu": cpu, "ok": ok, "refused": refused, "bytes_in": bytes_in,
            "bytes_out": bytes_out}


def measure(files: list[bytes], target: str | None, verify: bool, repeat: int,
            copy_into: tuple[list[Path], Path] | None = None) -> dict[str, Any]:
    """Median of ``repeat`` passes of ``target`` (``None``: no transcode), or of the plain copy
    (``copy_into``: the source paths and a scratch folder)."""
    if copy_into is not None:
        runs = [copy_pass(*copy_into) for _ in range(repeat)]
    else:
        runs = [one_pass(files, target, verify) for _ in range(repeat)]
    seconds = statistics.median(r["seconds"] for r in runs)
    cpu = statistics.median(r["cpu"] for r in runs)
    last = runs[-1]
    return {
        "target": "copy" if copy_into is not None else target or "none",
        "verify": None if copy_into is not None else verify,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "files_per_s": round(len(files) / max(cpu, 1e-9), 1),
        "files_per_wall_s": round(len(files) / max(seconds, 1e-9), 1),
        "ok": last["ok"],
        "refused": last["refused"],
        "out_over_in": round(last["bytes_out"] / max(1, last["bytes_in"]), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES)
    parser.add_argument("--targets", nargs="*", default=list(tc.SUPPORTED))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-verify-too", action="store_true",
                        help="also measure every target with verify=False")
    parser.add_argument("--images-only", action="store_true",
                        help="skip files without PixelData (SR, PDF, ...)")
    parser.add_argument("--sources", choices=("all", "native", "encapsulated"), default="all",
                        help="only the files stored uncompressed / compressed")
    parser.add_argument("--per-syntax", type=int, default=0,
                        help="at most N files of each source transfer syntax (0: all)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if not args.samples.is_dir():
        print(f"no sample folder at {args.samples}", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")
    loaded = load(args.samples, args.images_only, args.sources, args.per_syntax)
    paths, files = [p for p, _ in loaded], [d for _, d in loaded]
    size = sum(len(f) for f in files)
    print(f"{len(files)} files ({args.sources} sources), {size / 1e6:.1f} MB from {args.samples}; "
          f"median of {args.repeat}; Python {platform.python_version()}, 1 process")
    with tempfile.TemporaryDirectory(prefix="transcode-bench-") as tmp:
        rows = [measure(files, None, True, args.repeat, copy_into=(paths, Path(tmp) / "copy"))]
    rows.append(measure(files, None, True, args.repeat))
    copy_wall, base = rows[0]["files_per_wall_s"], rows[1]["files_per_s"]
    for row in rows[:2]:
        row["vs_copy"], row["vs_none"] = round(row["files_per_wall_s"] / copy_wall, 4), round(row["files_per_s"] / base, 4)
    for target in args.targets:
        for verify in (True, False) if args.no_verify_too else (True,):
            row = measure(files, target, verify, args.repeat)
            row["vs_copy"] = round(row["files_per_wall_s"] / copy_wall, 4)
            row["vs_none"] = round(row["files_per_s"] / base, 4)
            rows.append(row)
    header = (f"{'target':<24} {'name':<44} {'verify':>6} {'files/s':>8} {'vs none':>8} "
              f"{'wall f/s':>8} {'vs copy':>8} {'ok':>4} {'refused':>7} {'out/in':>7}")
    print(header)
    print("-" * len(header))
    for row in rows:
        name = {"copy": "plain file copy (read_bytes + write_bytes)",
                "none": "read + write, no transcode"}.get(row["target"]) or tc.SUPPORTED[row["target"]]
        verify = "-" if row["target"] == "copy" else "on" if row["verify"] else "off"
        print(f"{row['target']:<24} {name[:44]:<44} {verify:>6} "
              f"{row['files_per_s']:>8.1f} {row['vs_none']:>8.2f} "
              f"{row['files_per_wall_s']:>8.1f} {row['vs_copy']:>8.3f} {row['ok']:>4} "
              f"{row['refused']:>7} {row['out_over_in']:>7.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
