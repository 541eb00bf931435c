"""Instructions per file of the core, counted by valgrind (callgrind): a before/after measure
for changes on the hot path that does not depend on how busy the machine is.

Wall-clock figures on these shared VMs move by 2-3x from one run to the next (see the README's
Speed section); an A/B of a 5% change drowns in that. Callgrind counts the instructions the
process executes instead, whatever else the machine runs: the same code on the same inputs
gives the same count (hash randomization, address-space layout and numpy's BLAS threads are
pinned, the cyclic garbage collector is off during the passes), so two commits can be compared
exactly, one after the other, from the same shell (the environment's size moves the memory
layout: another shell gave counts 0.1% apart). Measured with it: hoisting two module constants
into locals in the reader's loop added 0.16% (Python 3.11 caches global lookups), so it was not
done. It counts user-space instructions only, so the kernel's share (reading and writing files) is not
in it: no file I/O is done here, the files are read into memory first and the outputs are
produced as buffers (``dicomio.write_parts``), not hashed (under valgrind OpenSSL does not see
the CPU's SHA instructions and its portable code would dominate the count).

Each mode runs in two child processes under callgrind: one makes one pass over the files, the
other three; half the difference is one pass, free of start-up and import costs. Modes:

- ``read``: ``dicomio.read_dataset``;
- ``read+write``: read + ``write_parts`` of the unchanged dataset;
- ``anonymize``: read + ``engine.apply`` (default 2023b body) + ``write_parts``;
- ``modify``: read + ``engine.apply`` (a small /modify body) + ``write_parts``.

Usage::

    python benchmarks/instructions.py [--files 60] [--modes read,anonymize]

Prints instructions per file for each mode and each mode's ratio to ``read+write``. Needs
``valgrind`` (Debian package); about 40 s per mode.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = ("read", "read+write", "anonymize", "modify")
_COLLECTED = re.compile(rb"(?:Collected :|I\s+refs:)\s+([\d,]+)")


def _work(mode: str, datas: list[bytes]) -> None:
    """One pass of ``mode`` over ``datas`` (in the child)."""
    from core import MODIFY_BODY

    from transforms import dicomio
    from transforms.engine import apply
    from transforms.identity import Key
    from transforms.request import parse_anonymize, parse_modify

    key = Key.from_bytes(b"benchmark-key-0123456789")
    plan = {"anonymize": parse_anonymize({}), "modify": parse_modify(MODIFY_BODY)}.get(mode)
    for data in datas:
        ds = dicomio.read_dataset(data)
        if mode == "read":
            continue
        if plan is not None:
            ds = apply(plan, ds, key)
        dicomio.write_parts(ds)


def _child(mode: str, passes: int, listing: str) -> None:
    import gc

    datas = [Path(line).read_bytes() for line in Path(listing).read_text().splitlines()]
    _work(mode, datas[:1])  # first-use costs (lazy imports, caches) in both children alike
    # A full collection walks every object the imports made (millions of instructions) at a
    # moment that shifts with everything allocated before: the passes run without the
    # collector, so the count is the code's own work (reference counting still frees).
    gc.collect()
    gc.disable()
    for _ in range(passes):
        _work(mode, datas)


def _count(mode: str, passes: int, listing: Path) -> int:
    """Instructions executed by a child making ``passes`` passes over the files in ``listing``."""
    # Repeatable to the instruction (measured: three identical runs, three equal totals) only
    # with all three: numpy's OpenBLAS starts worker threads at import whose spinning depends
    # on timing (~0.3% of a run), and address-space randomization moves id-based hashes.
    env = dict(os.environ, PYTHONHASHSEED="0", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    no_aslr = ["setarch", "-R"] if shutil.which("setarch") else []
    done = subprocess.run(
        [*no_aslr, "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, __file__, "--child", mode, str(passes), str(listing)],
        capture_output=True, env=env, check=False,
    )
    found = _COLLECTED.findall(done.stderr)
    if done.returncode != 0 or not found:
        raise SystemExit(f"callgrind run failed ({done.returncode}): {done.stderr[-1500:].decode(errors='replace')}")
    return int(found[-1].replace(b",", b""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--files", type=int, default=60, help="sample files per pass (default 60)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PASSES", "LISTING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]), args.child[2])
        return 0
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if shutil.which("valgrind") is None:
        print("valgrind not found (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    from core import SAMPLES, usable_samples

    if not SAMPLES.is_dir():
        print(f"samples not found at {SAMPLES}", file=sys.stderr)
        return 2
    paths = [path for path, _ in usable_samples(SAMPLES)][: args.files]
    print(f"{len(paths)} sample files, {sum(p.stat().st_size for p in paths) / 1e6:.1f} MB per pass", flush=True)
    per_file: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "files.txt"
        listing.write_text("\n".join(map(str, paths)) + "\n")
        for mode in modes:
            one, three = _count(mode, 1, listing), _count(mode, 3, listing)
            per_file[mode] = (three - one) / 2 / len(paths)
            print(f"{mode:<11} {per_file[mode]:>14,.0f} instructions per file", flush=True)
    if "read+write" in per_file:
        print()
        for mode, count in per_file.items():
            print(f"{mode:<11} {count / per_file['read+write']:>6.2f} x read+write")
    return 0


if __name__ == "__main__":
    sys.exit(main())
