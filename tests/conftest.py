"""Shared test fixtures: where the real sample files are, and a fixed key."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Real DICOM files from Orthanc's test suite; CI has them, a fresh machine may not.
SAMPLES = REPO.parent / "shared" / "dicom-samples"


@pytest.fixture
def samples() -> Path:
    """The shared sample folder; skips the test cleanly when it is absent."""
    if not SAMPLES.is_dir():
        pytest.skip(f"shared DICOM samples not found at {SAMPLES}")
    return SAMPLES


def sample(relative: str) -> Path:
    """Path of one shared sample file, skipping the calling test when it is absent."""
    path = SAMPLES / relative
    if not path.is_file():
        pytest.skip(f"shared DICOM sample {relative} not found")
    return path
