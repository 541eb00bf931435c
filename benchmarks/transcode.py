"""Transcode benchmark: the throughput cost of each target transfer syntax.

For every file of a sample folder (default ``../shared/dicom-samples``, every file that
``read_dataset`` accepts; files are loaded into memory first, so disk I/O is not measured), one
process runs

- ``none``: ``read_dataset`` + ``write_dataset`` - the floor every target is compared with;
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
distort it; ``wall f/s`` is the same over wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
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
) -> list[bytes]:
    """Every readable DICOM file under ``folder``; with pixel data only (``images_only``);
    ``sources`` ``native`` / ``encapsulated`` keeps the files stored uncompressed / compressed;
    ``per_syntax`` keeps at most that many files of each source transfer syntax (in path order).
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
        files.append(data)
    return files


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


def measure(files: list[bytes], target: str | None, verify: bool, repeat: int) -> dict[str, Any]:
    runs = [one_pass(files, target, verify) for _ in range(repeat)]
    seconds = statistics.median(r["seconds"] for r in runs)
    cpu = statistics.median(r["cpu"] for r in runs)
    last = runs[-1]
    return {
        "target": target or "none",
        "verify": verify,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "files_per_s": round(len(files) / cpu, 1),
        "files_per_wall_s": round(len(files) / seconds, 1),
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
    files = load(args.samples, args.images_only, args.sources, args.per_syntax)
    size = sum(len(f) for f in files)
    print(f"{len(files)} files ({args.sources} sources), {size / 1e6:.1f} MB from {args.samples}; "
          f"median of {args.repeat}; Python {platform.python_version()}, 1 process")
    rows = [measure(files, None, True, args.repeat)]
    base = rows[0]["files_per_s"]
    for target in args.targets:
        rows.append(measure(files, target, True, args.repeat))
        if args.no_verify_too:
            rows.append(measure(files, target, False, args.repeat))
    header = (f"{'target':<24} {'name':<44} {'verify':>6} {'files/s':>8} {'vs none':>8} "
              f"{'wall f/s':>8} {'ok':>4} {'refused':>7} {'out/in':>7}")
    print(header)
    print("-" * len(header))
    for row in rows:
        name = tc.SUPPORTED.get(row["target"], "read + write, no transcode")[:44]
        print(f"{row['target']:<24} {name:<44} {('on' if row['verify'] else 'off'):>6} "
              f"{row['files_per_s']:>8.1f} {row['files_per_s'] / base:>8.2f} "
              f"{row['files_per_wall_s']:>8.1f} {row['ok']:>4} "
              f"{row['refused']:>7} {row['out_over_in']:>7.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
