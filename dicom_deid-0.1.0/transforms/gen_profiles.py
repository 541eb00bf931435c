"""Generate ``transforms/data/profiles.json`` from the Orthanc profile extraction.

The facts are those of DICOM PS3.15 Table E.1-1 (Basic Profile column) of the editions
2008, 2017c, 2021b and 2023b, as Orthanc applies them (``orthanc-profiles.json`` in the team's
reference folder, extracted from jodogne/OrthancMirror). This script re-encodes them in the
project's compact format, checks them on the way, and is re-runnable:

    python -m transforms.gen_profiles [SOURCE] [--output PATH] [--check]

``SOURCE`` defaults to ``../shared/reference/orthanc-profiles.json`` relative to the repository
root. ``--check`` writes nothing and exits 1 if the committed file differs from a fresh run.

Output format (``format: dicom-deid-profiles/1``), per version:

- ``remove`` / ``clear`` / ``map_uid``: sorted ``GGGGEEEE`` upper-case hex tags;
- ``keep_remap``: the X/Z/U* sequences (kept, nested UIDs remapped);
- ``hierarchy_uids``: Study/Series/SOP Instance UID tags (handled by UID regeneration);
- ``patient_id`` / ``patient_name``: tags handled by the pseudonym step;
- ``removed_ranges``: ``[group_lo, group_hi, element_lo, element_hi]`` hex, with name and code;
- ``ps315``: tag -> PS3.15 Basic Profile code (absent for 2008, whose list carries none);
- ``source_entries``, ``source_duplicates``: entry counts of the source (duplicates included)
  and the tags it lists twice with the same action (2023b: three AE title tags);
- ``edition``, ``citation``, ``method``: the edition and the DeidentificationMethod suffix.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FORMAT = "dicom-deid-profiles/1"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "reference" / "orthanc-profiles.json"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "data" / "profiles.json"

# Orthanc's generator (GenerateAnonymizationProfile.py) maps PS3.15 codes to actions this way;
# Orthanc never writes dummy values, so D becomes an empty value.
CODE_TO_ACTION = {
    "X": "remove",
    "X/Z": "remove",
    "X/D": "remove",
    "X/Z/D": "remove",
    "Z": "clear",
    "D": "clear",
    "Z/D": "clear",
    "U": "map_uid",
}
TABLE_ACTIONS = ("remove", "clear", "map_uid")
HIERARCHY = {
    "regenerate_study_instance_uid": "study",
    "regenerate_series_instance_uid": "series",
    "regenerate_sop_instance_uid": "instance",
}
SPECIAL = {"map_patient_id": "patient_id", "replace_patient_name": "patient_name"}
KEEP_REMAP = "keep_sequence_remap_nested_uids"


class SourceError(ValueError):
    """The source file does not hold what the generator expects."""


def _hex_tag(text: str) -> str:
    group, element = text.split(",")
    value = f"{int(group, 16):04X}{int(element, 16):04X}"
    if len(value) != 8:
        raise SourceError(f"bad tag {text!r}")
    return value


def _range(entry: Mapping[str, Any]) -> dict[str, Any]:
    g_lo, g_hi = entry["groups"].split("-")
    e_lo, e_hi = entry["elements"].split("-")
    if entry["action"] != "remove":
        raise SourceError(f"range {entry['groups']},{entry['elements']}: unexpected action {entry['action']!r}")
    return {
        "groups": [g_lo.upper(), g_hi.upper()],
        "elements": [e_lo.upper(), e_hi.upper()],
        "name": entry["orthanc_name"],
        "ps315": entry.get("ps315_code"),
    }


def _edition_citation(version: str) -> str:
    if version == "2008":
        return (
            "DICOM PS 3.15-2008, Annex E, Table E.1-1 (Application Level Confidentiality Profile "
            "Attributes), as hand-listed by Orthanc (DicomModification.cpp); the list records no codes"
        )
    return (
        f"DICOM PS3.15 {version}, Annex E, Table E.1-1 (Application Level Confidentiality Profile "
        "Attributes), Basic Profile column"
    )


def build_version(version: str, profile: Mapping[str, Any]) -> dict[str, Any]:
    """One version's entry of the output, checked against the source's own counts."""
    actions: dict[str, list[str]] = {name: [] for name in TABLE_ACTIONS}
    keep_remap: list[str] = []
    hierarchy: dict[str, str] = {}
    special: dict[str, str] = {}
    codes: dict[str, str] = {}
    seen: dict[str, tuple[str, str | None]] = {}
    duplicates: list[str] = []
    for entry in profile["tags"]:
        tag = _hex_tag(entry["tag"])
        action, code = entry["action"], entry.get("ps315_code")
        if tag in seen:
            # Orthanc's 2023b table lists a few tags twice with the same action: harmless, so
            # keep one and record the duplicate; a conflicting duplicate would be a real error.
            if seen[tag] != (action, code):
                raise SourceError(f"{version}: tag {entry['tag']} listed twice with different actions")
            duplicates.append(tag)
            continue
        seen[tag] = (action, code)
        if code is not None:
            codes[tag] = code
            expected = CODE_TO_ACTION.get(code)
            if action in TABLE_ACTIONS and expected != action:
                raise SourceError(f"{version}: {entry['tag']} has code {code} but action {action}")
        if action in TABLE_ACTIONS:
            actions[action].append(tag)
        elif action == KEEP_REMAP:
            keep_remap.append(tag)
        elif action in HIERARCHY:
            hierarchy[HIERARCHY[action]] = tag
        elif action in SPECIAL:
            special[SPECIAL[action]] = tag
        else:
            raise SourceError(f"{version}: {entry['tag']} has unknown action {action!r}")
    counts = profile["counts"]
    for name in TABLE_ACTIONS:
        entries = len(actions[name]) + sum(seen[tag][0] == name for tag in duplicates)
        if entries != counts.get(name, 0):
            raise SourceError(f"{version}: {entries} {name} entries, source counts say {counts.get(name, 0)}")
    if sorted(hierarchy) != ["instance", "series", "study"] or sorted(special) != ["patient_id", "patient_name"]:
        raise SourceError(f"{version}: hierarchy UIDs or patient tags missing")

    method = profile["deidentification_method"]
    prefix = "Orthanc {ORTHANC_VERSION} - "
    if not method.startswith(prefix):
        raise SourceError(f"{version}: unexpected DeidentificationMethod {method!r}")
    out: dict[str, Any] = {
        "edition": f"PS 3.15-{version}",
        "citation": _edition_citation(version),
        "method": method[len(prefix):],
        "remove": sorted(actions["remove"]),
        "clear": sorted(actions["clear"]),
        "map_uid": sorted(actions["map_uid"]),
        "keep_remap": sorted(keep_remap),
        "hierarchy_uids": hierarchy,
        **special,
        "removed_ranges": [_range(r) for r in profile["removed_ranges"]],
        "source_entries": {name: counts.get(name, 0) for name in TABLE_ACTIONS},
        "source_duplicates": sorted(duplicates),
    }
    if codes:
        out["ps315"] = dict(sorted(codes.items()))
    return out


def build(source: Mapping[str, Any], source_sha256: str) -> dict[str, Any]:
    """The whole output document from the parsed source."""
    origin = source["source"]
    return {
        "format": FORMAT,
        "generated_by": "transforms/gen_profiles.py (do not edit by hand; re-run the generator)",
        "standard": "DICOM PS3.15 Annex E, Table E.1-1, Basic Application Level Confidentiality Profile",
        "derived_from": {
            "file": "orthanc-profiles.json",
            "sha256": source_sha256,
            "repository": origin["repository"],
            "commit": origin["commit"],
            "commit_date": origin["commit_date"],
        },
        "code_to_action": {**CODE_TO_ACTION, "X/Z/U*": "keep_remap"},
        "default_version": source["default_version"],
        "versions": {v: build_version(v, p) for v, p in source["profiles"].items()},
    }


def render(document: Mapping[str, Any]) -> str:
    """Stable text: sorted lists, one tag per line (readable diffs), trailing newline."""
    return json.dumps(document, indent=1, ensure_ascii=True) + "\n"


def generate(source_path: Path) -> str:
    raw = source_path.read_bytes()
    return render(build(json.loads(raw), hashlib.sha256(raw).hexdigest()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--check", action="store_true", help="compare with OUTPUT instead of writing it")
    args = parser.parse_args(argv)
    try:
        text = generate(args.source)
    except (OSError, SourceError, KeyError, json.JSONDecodeError) as exc:
        print(f"gen_profiles: {args.source}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
        if current != text:
            print(f"gen_profiles: {args.output} is out of date; re-run the generator", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
