"""Shared test fixtures: where the real sample files are, and a fixed key."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Where the sample folder is when it is not ``../shared/dicom-samples`` beside the checkout.
SAMPLES_ENV = "DICOM_DEID_SAMPLES"
#: Real DICOM files from Orthanc's test suite; CI has them, a fresh machine may not.
SAMPLES = Path(os.environ.get(SAMPLES_ENV) or REPO.parent / "shared" / "dicom-samples")
#: Set to 1 by CI (``.ci/run``): there a missing ``../shared`` folder fails the tests that need
#: it instead of skipping them, so CI cannot pass with those tests silently skipped.
REQUIRE_SAMPLES_ENV = "DICOM_DEID_REQUIRE_SAMPLES"


def required(env: str) -> bool:
    """True when the environment variable ``env`` is ``1`` (CI sets the ``DICOM_DEID_REQUIRE_*``)."""
    return os.environ.get(env) == "1"


def skip_unless_required(reason: str, env: str) -> NoReturn:
    """Skip the calling test (a fresh machine) or, when ``env`` requires what is missing, fail it."""
    if required(env):
        pytest.fail(f"{reason} ({env}=1)", pytrace=False)
    pytest.skip(reason)


def samples_required() -> bool:
    """True when ``DICOM_DEID_REQUIRE_SAMPLES=1`` (CI)."""
    return required(REQUIRE_SAMPLES_ENV)


def missing_samples(reason: str) -> NoReturn:
    """Skip the calling test (a fresh machine) or, when the samples are required, fail it."""
    skip_unless_required(reason, REQUIRE_SAMPLES_ENV)


#: The split and merge pipeline tests' key (the ``key_file`` fixture writes it).
SPLIT_MERGE_KEY_BYTES = b"split-merge-pipeline-test-key-01"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    path.write_bytes(SPLIT_MERGE_KEY_BYTES)
    return path


@pytest.fixture
def samples() -> Path:
    """The shared sample folder; skips the test cleanly when it is absent (fails in CI)."""
    if not SAMPLES.is_dir():
        missing_samples(f"shared DICOM samples not found at {SAMPLES}")
    return SAMPLES


def sample(relative: str) -> Path:
    """Path of one shared sample file.

    Skips the calling test when the whole sample folder is absent (a fresh machine; fails
    when the samples are required); fails when the folder is there but the file is not, since
    that is a renamed or lost sample, not a missing installation.
    """
    if not SAMPLES.is_dir():
        missing_samples(f"shared DICOM samples not found at {SAMPLES}")
    path = SAMPLES / relative
    if not path.is_file():
        pytest.fail(f"shared DICOM sample {relative} not found in {SAMPLES}", pytrace=False)
    return path


def documented_uid(secret: bytes, namespace: str, value: str) -> str:
    """``2.25.`` + the first 128 bits of HMAC-SHA256(secret, len-prefixed namespace and value):
    transforms/identity.py's documented construction, computed here without its code."""
    parts = [namespace.encode("utf-8"), value.encode("utf-8")]
    message = b"".join(struct.pack(">I", len(part)) + part for part in parts)
    mac = hmac.new(secret, message, hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(mac[:16], "big"))


def operation_digest(parts: list[str]) -> str:
    """SHA-256 hex of the parts, each prefixed with its length in 8 bytes, big endian: the
    name split and merge give their inputs before keying it (``splitmerge._digest``)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()
