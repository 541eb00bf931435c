"""A long mutation run: the property test of ``test_hostile.py``, for minutes instead of 80 cases.

Mutates real files (pydicom's bundled ones, two of them recompressed as High-Throughput JPEG
2000 when imagecodecs is installed, and, when present, the shared samples under 1.5 MB)
with the property test's operations (truncate, flip a byte, insert garbage, cut or duplicate a
slice; 60% of the time inside the element headers), processes each under one of the property
test's requests or a few more (transcodes to every native syntax and to JPEG-LS, JPEG 2000 and
JPEG, a modify removing sequences, a 2017c anonymization keeping private tags), and checks the
same invariants: one row, a specific reason when it fails (never ``internal_error``), nothing
partial, and a written file reads back (and fully with pydicom when the input did).

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
VR US, which pydicom decodes as numbers, and (``--structured``) a FrameOfReferenceUID given VR OB
and a 90 KB value, kept as a view of the file like large binary values. Since then a case that raises the peak resident size by
more than 1 GB is a finding (``memory: ...``), and ``--memory-mb`` keeps a runaway allocation
from reaching the kernel's limit. Known and left: a file without PixelRepresentation written in
implicit VR holds US-or-SS elements that pydicom cannot resolve when reading (it raises
AttributeError; DCMTK reads them as US), reported as "pydicom worse".
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
from tests.test_hostile import BASES, PLANS, _header_end, _mutate
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
]


#: A case that raises the process's peak resident size by more than this is a finding.
_MEMORY_FINDING_MB = 1024


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


# --- structure-aware mutations (``--structured``) ----------------------------------------------

_VRS = [vr.encode("ascii") for vr in sorted(
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split())]
_LONG = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
#: Tags a damaged element may take: the ones the reader, the engine and the writer look at.
_TAGS = [0x00080005, 0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00100010, 0x00100020,
         0x00280002, 0x00280004, 0x00280008, 0x00280010, 0x00280011, 0x00280100, 0x00280101,
         0x00280103, 0x7FE00010, 0x7FE00008, 0x00020010, 0x00020000, 0x00000000, 0x00080000,
         0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD, 0x00090010, 0x00091010, 0x00091001, 0x00081140,
         0x00082112, 0x52009230, 0x30060020, 0x0040A730, 0x00081155, 0x00200052, 0x60003000,
         0x50000010, 0x00181000, 0x00100030, 0x00080020, 0x00431029, 0x7FE10010]
#: Values a damaged element may hold (its length set to match).
_VALUES = [b"", b"\\", b"\\\\\\", b"ISO 2022 IR 87", b"ISO_IR 192", b"ISO 2022 IR 13\\ISO 2022 IR 87",
           b"ISO_IR 100\\GB18030", b"\x1b$B\x30\x21", b"\xff\xfe\xfd", b"1.2.3\x00", b"1.2.3 ",
           b"01.2", b"1..2", b"2.25." + b"9" * 60, b"A" * 65, b"0" * 1000, b"-1", b"1e400", b"NaN ",
           b"\x00\x00", b"\xff\xff", b"\x00\x80", b"\x01\x00\x00\x00", b"\xff\xff\xff\xff\xff\xff\xff\xff",
           b"YES ", b"MONOCHROME2 ", b"RGB ", b"YBR_FULL_422", b"PALETTE COLOR ", b"Doe^John^^^",
           b"=\x1b$B\x30\x21", b"19000101", b"20261301", b"\xfe\xff\x00\xe0\x00\x00\x00\x00"]


def _element_spans(data: bytes) -> list[tuple]:
    """Every element header the walk reaches (file meta, data set, inside items at any depth):
    (offset, header size, VR or None (implicit), length offset, length size, length, little,
    end). A tolerant walk: it stops where the layout stops making sense."""
    import struct

    spans: list[tuple] = []

    def walk(pos: int, end: int, implicit: bool, little: bool, depth: int, meta: bool = False) -> int:
        order = "<" if little else ">"
        while pos + 8 <= end and depth < 40:
            group, elem = struct.unpack_from(order + "HH", data, pos)
            tag = group << 16 | elem
            if meta and group != 0x0002:
                return pos
            if tag in (0xFFFEE00D, 0xFFFEE0DD):
                return pos + 8
            if implicit or group == 0xFFFE:
                vr, length, header, lpos, lsize = None, struct.unpack_from(order + "I", data, pos + 4)[0], 8, pos + 4, 4
            else:
                vr = data[pos + 4:pos + 6]
                if vr in _LONG:
                    if pos + 12 > end:
                        return end
                    length, header, lpos, lsize = struct.unpack_from(order + "I", data, pos + 8)[0], 12, pos + 8, 4
                else:
                    length, header, lpos, lsize = struct.unpack_from(order + "H", data, pos + 6)[0], 8, pos + 6, 2
            start = pos + header
            sequence = vr == b"SQ" or (vr in (None, b"UN") and length == 0xFFFFFFFF) or tag == 0xFFFEE000
            if length == 0xFFFFFFFF:
                after = walk(start, end, implicit or vr == b"UN", little, depth + 1) if sequence else end
            elif start + length > end:
                spans.append((pos, header, vr, lpos, lsize, length, little, end))
                return end
            else:
                after = start + length
                if sequence:
                    walk(start, after, implicit, little, depth + 1)
            if meta and tag == 0x00020010:
                syntax[0] = data[start:after].rstrip(b"\x00 ")
            spans.append((pos, header, vr, lpos, lsize, length, little, after))
            pos = after
        return end

    syntax = [b""]
    try:
        pos = walk(132, len(data), False, True, 0, meta=True) if data[128:132] == b"DICM" else 0
        if syntax[0] == b"1.2.840.10008.1.2.1.99":
            return spans
        little = syntax[0] != b"1.2.840.10008.1.2.2"
        if syntax[0]:
            walk(pos, len(data), syntax[0] == b"1.2.840.10008.1.2", little, 0)
            return spans
    except struct.error:
        return spans
    found = []  # no meta: whichever reading reaches further, from the first bytes or the next
    for start in (pos, pos + 1):
        for implicit in (True, False):
            del spans[:]
            try:
                walk(start, len(data), implicit, True, 0)
            except struct.error:
                pass
            found = max(found, list(spans), key=len)
    return found


def _structured(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """``data`` with one element damaged the way writers and bit rot damage them: its VR,
    length, tag or value changed, or it is duplicated, dropped or swapped with the next."""
    import struct

    spans = _element_spans(data)
    if not spans:
        return data, "none"
    pos, header, vr, lpos, lsize, length, little, end = rng.choice(spans)
    order = "<" if little else ">"
    kind = rng.choice(["vr", "length", "tag", "value", "value", "duplicate", "drop", "swap"])
    if kind == "vr" and vr is not None:
        new = rng.choice(_VRS)
        return data[:pos + 4] + new + data[pos + 6:], f"vr {pos} {vr!r}->{new!r}"
    if kind == "length":
        top = 0xFFFFFFFF if lsize == 4 else 0xFFFF
        new = min(top, rng.choice([0, 1, 2, 3, length + 1, max(0, length - 1), length * 2, top, top - 1,
                                   0x7FFFFFFF, rng.randrange(top + 1)]))
        return data[:lpos] + struct.pack(order + ("I" if lsize == 4 else "H"), new) + data[lpos + lsize:], \
            f"length {pos} {length}->{new}"
    if kind == "tag":
        tag = rng.choice(_TAGS)
        return data[:pos] + struct.pack(order + "HH", tag >> 16, tag & 0xFFFF) + data[pos + 4:], f"tag {pos}->{tag:08X}"
    if kind == "value" and length != 0xFFFFFFFF and end == pos + header + length:
        value = rng.choice(_VALUES)
        if lsize == 2 and len(value) > 0xFFFF:
            value = value[:0xFFFF]
        return (data[:lpos] + struct.pack(order + ("I" if lsize == 4 else "H"), len(value)) + data[lpos + lsize:pos + header]
                + value + data[end:]), f"value {pos} {value[:20]!r}"
    if kind == "duplicate":
        return data[:end] + data[pos:end] + data[end:], f"duplicate {pos}-{end}"
    if kind == "drop":
        return data[:pos] + data[end:], f"drop {pos}-{end}"
    following = [s for s in spans if s[0] == end]
    if kind == "swap" and following:
        other_end = following[0][7]
        return data[:pos] + data[end:other_end] + data[pos:end] + data[other_end:], f"swap {pos}-{end}-{other_end}"
    return data, "none"


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
    while time.monotonic() < deadline:
        base = rng.choice(files)
        original = base.read_bytes()
        mutations = [_mutation(rng) for _ in range(rng.randint(1, 3))]
        if args.structured:
            data, mutations = original, []
            for _ in range(rng.randint(1, 3)):
                data, what = _structured(rng, data)
                mutations.append(what)
        elif rng.random() < 0.6:
            end = _header_end(original)
            data = _mutate(original[:end], mutations) + original[end:]
        else:
            data = _mutate(original, mutations)
        plan_index = rng.randrange(len(plans))
        cases += 1
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
        if problem is not None:
            broken[problem.split(":")[0]] += 1
            print(f"case {cases}: {base.name} {mutations!r} plan {plan_index}: {problem}", flush=True)
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                (args.keep / f"seed{args.seed}-case{cases}-plan{plan_index}.dcm").write_bytes(data)
    print(f"{cases} cases, {sum(broken.values())} broke an invariant: {dict(broken)}")
    print(f"outcomes: {dict(_OUTCOMES.most_common())}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
