"""Every real file we have, through the single-file worker function: what pydicom reads
cleanly is written, and everything written reads back cleanly with pydicom.

The files: pydicom's bundled test files (odd encodings, private sequences, big endian, no file
meta, deflate, compressed syntaxes, damaged files) and ``../shared/dicom-samples`` when present.
The reader's structure checks refuse damaged input; this guards the other side, that they never
refuse a file another reader accepts, and that the writer never produces one it would not."""

from __future__ import annotations

import tempfile
import warnings
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import UID

from tests.conftest import SAMPLES
from tests.pipeline_support import KEY
from transforms import request
from transforms.beam import RunConfig, process_file

BUNDLED = sorted(p for p in Path(get_testdata_file("CT_small.dcm")).parent.rglob("*")
                 if p.is_file() and p.stat().st_size < 20_000_000)
#: pydicom reads these silently short (values cut by the end of the file); we refuse them.
DELIBERATELY_REFUSED = {"MR_truncated.dcm": "truncated", "rtplan_truncated.dcm": "truncated"}
IDENTIFIERS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _clean_for_pydicom(data: bytes) -> bool:
    """pydicom reads the file, converts every element at every depth, and the identifiers are
    valid UIDs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(BytesIO(data), force=True)
            for elem in ds.iterall():
                elem.value  # noqa: B018 - converting is the check
            return all(ds.get(k) and UID(str(ds.get(k)).strip()).is_valid for k in IDENTIFIERS)
        except Exception:  # noqa: BLE001 - any failure means "not clean"
            return False


def _corpus() -> list[Path]:
    shared = sorted(p for p in SAMPLES.rglob("*") if p.is_file()) if SAMPLES.is_dir() else []
    return BUNDLED + shared


def test_the_bundled_corpus_is_there():
    assert len(BUNDLED) > 150  # pydicom 3.0 ships ~180 files (most of them DICOM) in its wheel


@pytest.mark.parametrize("body", [{}, {"DicomVersion": "2008", "KeepPrivateTags": True}], ids=["2023b", "2008-keep-private"])
def test_clean_inputs_are_written_and_outputs_read_back_cleanly(body):
    plan = request.parse_anonymize(body)
    refused, unreadable = [], []
    written = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(_corpus()):
            data = path.read_bytes()
            cfg = RunConfig(plan=plan, output_root=f"{tmp}/{i}", run_id="corpus", key_id=KEY.key_id, key=KEY)
            row, _ = process_file(str(path), len(data), cfg, KEY)
            if row["status"] == "written":
                written += 1
                if not _clean_for_pydicom(Path(row["output_uri"]).read_bytes()):
                    unreadable.append(path.name)
            elif DELIBERATELY_REFUSED.get(path.name) != row["reason"] and _clean_for_pydicom(data):
                refused.append((path.name, row["reason"], row["detail"]))
    assert refused == []
    assert unreadable == []
    assert written > 140  # of the bundled files alone, 146 (the rest are not DICOM, damaged, or lack identifiers)
