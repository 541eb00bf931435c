"""A long mutation run: the property test of ``test_hostile.py``, for minutes instead of 80 cases.

Mutates real files (pydicom's bundled ones, two of them recompressed as High-Throughput JPEG
2000 when imagecodecs is installed, and, when present, the shared samples under 1.5 MB)
with the property test's operations (truncate, flip a byte, insert garbage, cut or duplicate a
slice; 60% of the time inside the element headers), processes each under one of the property
test's requests or a few more (transcodes to every native syntax and to JPEG-LS, JPEG 2000 and
JPEG, a modify removing sequences, a 2017c anonymization keeping private tags, path edits at
depth in a series-level modify and in an anonymization), and checks the same invariants: one
row, a specific reason when it fails (never ``internal_error``), nothing partial, and a
written file reads back (and fully with pydicom when the input did).

Not collected by pytest (it runs until a deadline). Deterministic for a seed, up to the
deadline. Every case that breaks an invariant is printed and its bytes kept in ``--keep``::

    python -m tests.mutation_run --seed 11 --seconds 1500 --keep /tmp/mutations

``--structured`` damages whole elements instead of bytes, wherever a tolerant walk of the file
reaches them (file meta, data set, items at any depth): an element's VR, length or tag changed
(to tags the reader, engine and writer look at), its value replaced (odd character sets, bad
UIDs, numbers that do not fit; its length set to match), or the element duplicated, dropped or
swapped with the next.

``--splitmerge`` puts each mutated file through split/merge instead: indexed from its header as
pass 1 does, its series split out of its study or its study merged into another file's, then
moved as pass 2 does, with the same invariants.

Found this way and fixed (each now a regression test in ``test_dicomio.py``,
``test_hostile.py``, ``test_transcode.py`` or ``test_merge_core.py``): an implicit VR
InstanceNumber with an undefined length, a meta TransferSyntaxUID with VR US, US-or-SS elements
without PixelRepresentation, a stray delimiter among top-level elements, a DS that ISO_IR 13
decodes to katakana, an explicit SS on a sequence's tag written in implicit VR, an explicit CS
on an FL tag written in implicit VR, a damaged item tag (FFFE,063B) that pydicom reads on from,
a stray item delimiter after an undefined-length sequence where pydicom read leniently (it
dropped the pixel data), (not an invariant, a Rust panic printed on stderr) an RLE run past the
image, (``--splitmerge``) a merge's switch to UTF-8 that decoded a damaged DS as katakana,
(not an invariant: the kernel killed the run) a JPEG 2000 header declaring 11 million rows,
which openjpeg allocated (11.6 GB), and (``--splitmerge``) a SpecificCharacterSet damaged into
VR US, which pydicom decodes as numbers. Since then a case that raises the peak resident size by
more than 1 GB is a finding (``memory: ...``), and ``--memory-mb`` keeps a runaway allocation
from reaching the kernel's limit. ``--structured`` then found (regression tests in
``test_dicomio.py``, ``test_hostile.py``, ``test_anonymize_unknown_vr.py``,
``test_merge_core.py`` and ``test_transcode.py``): a large
FrameOfReferenceUID of VR OB, kept as a view of the file like binary values; new UIDs and
pseudonyms written under the input's VR where it cannot hold them (PatientName of VR UL,
SOPInstanceUID of VR IS); main UIDs of VR SS or AT, garbled by a change of byte order; a
PixelRepresentation of 5 bytes, which pydicom converts for the items of any sequence a path
edits; a sequence's tag on 4 bytes of UN; a sequence pydicom could not parse, which it
returns as text under VR SQ or raises OSError on when writing; (``--splitmerge``) a
SpecificCharacterSet retagged onto a sequence, which pydicom's character set lookup could not
take; and zero padding after the last element, copied with it into an output where eight
zero bytes read as an element of no valid VR; then (seed 58) a nested LUTData retagged as
StudyInstanceUID, whose 16,384 numbers mapped to 731,948 bytes of UIDs, more than the 16-bit
length of an explicit VR (now written as UN). Known and left: a file without
PixelRepresentation written in implicit VR holds US-or-SS elements that pydicom cannot resolve
when reading (it raises AttributeError; DCMTK reads them as US), reported as "pydicom worse".
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import resource
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

from tests.conftest import SAMPLES
from tests.pipeline_support import KEY, output_files, pydicom_converts_all
from tests.test_hostile import BASES, CT_CLASS, PLANS, _header_end, _mutate, damage_element
from transforms import dicomio, request
from transforms.beam import RunConfig, process_file

REASONS = ("not_dicom", "empty", "truncated", "too_deep", "invalid_uid", "invalid_value", "cannot_transcode",
           "refused_by_request")
MORE_PLANS = [
    *(request.parse_anonymize({"Transcode": uid}) for uid in (
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.50")),
    request.parse_modify({"Remove": ["ReferencedImageSequence", "SourceImageSequence"],
                          "Replace": {"SeriesDescription": "x"}}),
    request.parse_anonymize({"DicomVersion": "2017c", "Keep": ["StudyDescription"], "KeepPrivateTags": True}),
    # Path edits at depth (items parsed by pydicom, unlike the anonymizer's own walk), a sequence
    # replaced from JSON, new series UIDs: on the sequences of the RT, enhanced and SR bases.
    request.parse_modify({
        "Remove": ["ReferencedFrameOfReferenceSequence[*].RTReferencedStudySequence[*].ReferencedSOPClassUID",
                   "BeamSequence[0].ControlPointSequence[*].GantryAngle", "RTROIObservationsSequence"],
        "Replace": {
            "ReferencedFrameOfReferenceSequence[*].RTReferencedStudySequence[*].RTReferencedSeriesSequence[*]"
            ".SeriesInstanceUID": "1.2.3.4",
            "BeamSequence[*].BeamName": "B",
            "SharedFunctionalGroupsSequence[*].PixelMeasuresSequence[*].SliceThickness": "1.5",
            "ReferencedImageSequence": [{"ReferencedSOPClassUID": CT_CLASS, "ReferencedSOPInstanceUID": "1.2.3"}]},
        "RemovePrivateTags": True}, level="Series"),
    request.parse_anonymize({
        "Keep": ["ReferencedImageSequence[*].ReferencedSOPInstanceUID", "SourceImageSequence",
                 "StructureSetROISequence[*].ROIName"],
        "Remove": ["ReferencedStudySequence[*].ReferencedSOPClassUID", "ROIContourSequence[*].ContourSequence[*].ContourData"],
        "Replace": {"ReferencedPatientSequence": [{"PatientName": "P^Q", "OtherPatientIDsSequence": [{"PatientID": "x"}]}],
                    "ROIContourSequence[*].ROIDisplayColor": "1\\2\\3"},
        "DicomVersion": "2021b"}),
]


#: A case that raises the process's peak resident size by more than this is a finding.
_MEMORY_FINDING_MB = 1024
#: A case that takes longer than this (seconds) is a finding: inputs under 1.5 MB take milliseconds.
_TIME_FINDING_S = 10.0


def _default_memory_mb() -> int:
    """3/4 of the machine's memory, at most 16 GiB."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4096
    return min(16 << 10, (total >> 20) * 3 // 4)


def _htj2k_bases(folder: Path) -> list[Path]:
    """High-Throughput JPEG 2000 copies of two bundled images (one grey, one RGB), written into
    ``folder``: no bundled or shared file is in that syntax. None without imagecodecs."""
    try:
        import imagecodecs
    except ImportError:
        return []
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.encaps import encapsulate

    made = []
    for name in ("CT_small.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        pixels = ds.pixel_array
        ds.PixelData = encapsulate([imagecodecs.htj2k_encode(pixels)])
        ds["PixelData"].VR = "OB"
        if pixels.ndim == 3:
            ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"
        made.append(folder / f"htj2k-{name}")
        ds.save_as(made[-1], enforce_file_format=True)
    return made


def _mutation(rng: random.Random) -> tuple:
    kind, where = rng.choice(["truncate", "flip", "insert", "cut", "duplicate"]), rng.random()
    if kind == "truncate":
        return (kind, where)
    if kind == "flip":
        return (kind, where, rng.randint(1, 255))
    if kind == "insert":
        return (kind, where, rng.randbytes(rng.randint(1, 64)))
    return (kind, where, rng.randint(1, 512))


_OUTCOMES: Counter = Counter()  # what the cases came to: written, or the reason they failed


def _broken_invariant(data: bytes, plan: object) -> str | None:
    """None when the invariants hold for ``data`` under ``plan``, else what broke."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.dcm", Path(tmp) / "out"
        src.write_bytes(data)
        cfg = RunConfig(plan=plan, output_root=str(out), run_id="mutation", key_id=KEY.key_id, key=KEY)
        row, _ = process_file(str(src), len(data), cfg, KEY)
        _OUTCOMES[row["status"] if row["status"] == "written" else row["reason"]] += 1
        files = output_files(out) if out.exists() else {}
        if row["status"] != "written":
            if row["reason"] not in REASONS:
                return f"{row['reason']}: {row['detail']}"
            return "a failed file left an output" if files else None
        if files != {row["output_uri"][len(str(out)) + 1:]: row["output_sha256"]}:
            return "the outputs are not the one the row names"
        output = Path(row["output_uri"]).read_bytes()
        try:
            dicomio.read_dataset(output)
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            return f"the output does not read back: {type(exc).__name__}: {exc}"
        if not pydicom_converts_all(output) and pydicom_converts_all(data):
            return "pydicom worse: the input converts fully, the output does not"
    return None


_SPLITMERGE_REASONS = (*REASONS, "not_selected", "duplicate_instance", "dicomdir")
_UIDS: dict[Path, tuple[str, str] | None] = {}


def _study_and_series(path: Path) -> tuple[str, str] | None:
    """The unmutated file's StudyInstanceUID and SeriesInstanceUID (None: it has none)."""
    if path not in _UIDS:
        try:
            ds = dicomio.read_dataset(path.read_bytes())
            _UIDS[path] = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        except Exception:  # noqa: BLE001 - a base without identifiers cannot be split
            _UIDS[path] = None
    return _UIDS[path]


def _broken_splitmerge(data: bytes, base: Path, other: Path, merge: bool, with_base: bool) -> str | None:
    """None when the split/merge invariants hold for ``data`` (a mutated ``base``), else what
    broke. A split moves ``base``'s series to a new study; a merge moves ``base``'s study into
    ``other``'s (unmutated, beside it in INPUT, as is ``base`` itself when ``with_base``: the
    same instance with other bytes). Pass 1 indexes the files from their headers as the
    pipeline does; a request the index refuses is the run's refusal (exit 2), no case."""
    from transforms import splitmerge as sm
    from transforms.splitmerge_files import ApplyConfig, IndexSelector, index_file, process_instance

    ids, target = _study_and_series(base), _study_and_series(other)
    if ids is None or target is None or (merge and ids[0] == target[0]):
        _OUTCOMES["no case: same study or no identifiers"] += 1
        return None
    if merge:
        req = sm.parse_merge(target[0], {"Resources": [ids[0]]})
        selector = IndexSelector.for_merge(req)
    else:
        req = sm.parse_split(ids[0], {"Series": [ids[1]], "Replace": {"PatientName": "Moved^Here", "StudyDescription": "x"}})
        selector = IndexSelector.for_split(req)
    with tempfile.TemporaryDirectory() as tmp:
        src, beside, out = Path(tmp) / "in" / "a.dcm", Path(tmp) / "in" / "b.dcm", Path(tmp) / "out"
        src.parent.mkdir()
        src.write_bytes(data)
        beside.write_bytes(other.read_bytes())
        files = [(str(src), len(data)), (str(beside), beside.stat().st_size)]
        if with_base:
            (Path(tmp) / "in" / "c.dcm").write_bytes(base.read_bytes())
            files.append((str(Path(tmp) / "in" / "c.dcm"), base.stat().st_size))
        entries = [e for e in (index_file(p, n, selector, 2 << 30) for p, n in files) if e is not None]
        try:
            plan = sm.plan_merge(entries, req, KEY) if merge else sm.plan_split(entries, req, KEY)
        except request.RequestError:
            _OUTCOMES["refused by the index (exit 2)"] += 1
            return None
        cfg = ApplyConfig(plan_uri="", output_root=str(out), run_id="mutation", key_id=KEY.key_id)
        written = {}
        for path, size in files:  # every input, as pass 2 does (the mutated one counted)
            row, _ = process_instance(path, size, plan, cfg)
            if path == str(src):
                _OUTCOMES[row["status"] if row["status"] in ("moved", "copied") else row["reason"]] += 1
            if row["status"] not in ("moved", "copied"):
                if row["reason"] not in _SPLITMERGE_REASONS:
                    return f"{row['reason']}: {row['detail']} ({Path(path).name})"
                continue
            written[row["output_uri"][len(str(out)) + 1:]] = row["output_sha256"]
            output = Path(row["output_uri"]).read_bytes()
            try:
                dicomio.read_dataset(output)
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                return f"the output does not read back: {type(exc).__name__}: {exc} ({Path(path).name})"
            source = Path(path).read_bytes()
            if not pydicom_converts_all(output) and pydicom_converts_all(source):
                return f"pydicom worse: the input converts fully, the output does not ({Path(path).name})"
        if (output_files(out) if out.exists() else {}) != written:
            return "the outputs are not the ones the rows name"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--keep", type=Path, help="folder for the bytes of each failing case")
    parser.add_argument("--splitmerge", action="store_true",
                        help="split the mutated file's series out of its study, or merge its study into another's")
    parser.add_argument("--structured", action="store_true",
                        help="damage whole elements (VR, length, tag, value; duplicate, drop, swap) at any depth "
                             "instead of bytes")
    parser.add_argument("--memory-mb", type=int, default=_default_memory_mb(),
                        help="address space limit, so that a runaway allocation fails instead of the kernel "
                             "killing the run (default: 3/4 of the memory, at most 16 GiB; 0: none)")
    args = parser.parse_args(argv)
    if args.memory_mb:
        limit = args.memory_mb << 20
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY or soft > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    rng = random.Random(args.seed)
    generated = tempfile.TemporaryDirectory()
    files = [*BASES, *_htj2k_bases(Path(generated.name))]
    if SAMPLES.is_dir():
        files += sorted(p for p in SAMPLES.rglob("*") if p.is_file() and p.stat().st_size < 1_500_000)
    plans = PLANS + MORE_PLANS
    deadline, cases, broken = time.monotonic() + args.seconds, 0, Counter()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    slowest: list[tuple[float, int, str]] = []
    while time.monotonic() < deadline:
        base = rng.choice(files)
        original = base.read_bytes()
        mutations = [_mutation(rng) for _ in range(rng.randint(1, 3))]
        if args.structured:
            data, mutations = original, []
            for _ in range(rng.randint(1, 3)):
                data, what = damage_element(rng, data)
                mutations.append(what)
        elif rng.random() < 0.6:
            end = _header_end(original)
            data = _mutate(original[:end], mutations) + original[end:]
        else:
            data = _mutate(original, mutations)
        plan_index = rng.randrange(len(plans))
        cases += 1
        started = time.monotonic()
        if args.splitmerge:
            plan_index = rng.randrange(2)  # 0 split, 1 merge
            problem = _broken_splitmerge(data, base, rng.choice(files), merge=plan_index == 1,
                                         with_base=rng.random() < 0.5)
        else:
            problem = _broken_invariant(data, plans[plan_index])
        peak_before, peak_kb = peak_kb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        grown = (peak_kb - peak_before) >> 10
        if problem is None and grown > _MEMORY_FINDING_MB:
            # Inputs under 1.5 MB never need gigabytes: the case that raised the peak is a finding.
            problem = f"memory: the peak resident size grew by {grown} MB"
        took = time.monotonic() - started
        slowest = sorted([*slowest, (took, cases, base.name)], reverse=True)[:5]
        if problem is None and took > _TIME_FINDING_S:
            # Nor seconds: a worker would stall on such a file (there is no per-file timeout).
            problem = f"time: the case took {took:.1f} s"
        if problem is not None:
            broken[problem.split(":")[0]] += 1
            print(f"case {cases}: {base.name} {mutations!r} plan {plan_index}: {problem}", flush=True)
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                (args.keep / f"seed{args.seed}-case{cases}-plan{plan_index}.dcm").write_bytes(data)
    print(f"{cases} cases, {sum(broken.values())} broke an invariant: {dict(broken)}")
    print(f"outcomes: {dict(_OUTCOMES.most_common())}")
    print("slowest: " + ", ".join(f"case {case} ({name}) {took:.2f} s" for took, case, name in slowest))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
