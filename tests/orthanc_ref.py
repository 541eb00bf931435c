"""A live Orthanc 1.10.1 on 127.0.0.1, as the reference for the differential tests.

The session fixture ``orthanc`` starts the Debian package's ``/usr/sbin/Orthanc`` once per test
session with a throw-away configuration (storage in a temp dir, no DICOM server, no remote
access), kept on the loopback interface by an ``LD_PRELOAD`` shim (``bind_loopback.c``, compiled
with gcc at test time, because Orthanc has no bind-address option). Tests that request it are
skipped when the binary or gcc is absent or the version is not 1.10.1, unless
``DICOM_DEID_REQUIRE_ORTHANC=1`` (set by CI): then they fail with the reason, so that CI cannot
pass with the differential tests skipped. The process is stopped by its PID at the end.

``OrthancClient`` is a tiny urllib client for the few REST routes the tests use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.conftest import SAMPLES

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
REFERENCE_VERSION = "1.10.1"  # Debian bookworm's package
#: Set to 1 by CI (``.ci/run``): an unusable reference fails the differential tests.
REQUIRE_ORTHANC_ENV = "DICOM_DEID_REQUIRE_ORTHANC"
SHIM_SOURCE = Path(__file__).with_name("bind_loopback.c")

# The private dictionary of Orthanc's integration-test configuration (orthanc-tests
# GenerateConfigurationForTests.py), in Orthanc's `Dictionary` format; both Orthanc and our
# engine get the same one.
TEST_DICTIONARY: dict[str, list[Any]] = {
    "00e1,10c2": ["UI", "PET-CT Multi Modality Name", 1, 1, "ELSCINT1"],
    "7053,1003": ["ST", "Original Image Filename", 1, 1, "Philips PET Private Group"],
    "4321,1012": ["LO", "RadioButton3", 1, 1, "RadioLogic"],
    "0009,1001": ["DS", "Abnormality score", 1, 1, "Lunit"],
}

#: Single instances of ../shared/dicom-samples swept by the differential tests: every
#: transfer syntax, character set and odd file that is not already part of a study case.
SWEEP_FILES: tuple[str, ...] = (
    "2020-08-12-Christopher.dcm", "2020-09-11-Christopher-ELSCINT1-Raw.dcm",
    "2020-09-12-ELSCINT1-PMSCT_RLE1.dcm", "2022-03-08-RicSmi.dcm",
    "2022-11-14-RLEPlanarConfiguration.dcm", "2023-04-21-RLEPlanarConfigurationYBR_FULL.dcm",
    "2024-05-30-GuillemVela.dcm", "2026-03-16-OD-OF-OL.dcm", "Beaufix/IM-0001-0001.dcm",
    "ColorTestImageJ.dcm", "ColorTestMalaterre.dcm", "Comunix/Pet/IM-0001-0001.dcm",
    "DummyCT-overwrite.dcm", "Issue124.dcm", "Issue141.dcm", "Issue143.dcm", "Issue154-d1.dcm",
    "Issue16.dcm", "Issue164.dcm", "Issue19.dcm", "Issue44/Monochrome1-Jpeg.dcm",
    "Issue56-NoPixelData.dcm", "Issue94.dcm", "KarstenHilbertRF.dcm", "LenaTwiceWithFragments.dcm",
    "PatientWith2studies/TEST_1_study_2345.dcm", "PilatesArgenturGEUltrasoundOsiriX.dcm",
    "Series/Lena-1.dcm", "SignedCT.dcm", "WithEmptyPatientComments.dcm",
    *(f"Encodings/{name}.dcm" for name in (
        "ISO_IR13", "Lena-arabic", "Lena-ascii", "Lena-cyrillic", "Lena-greek", "Lena-hebrew",
        "Lena-latin1", "Lena-latin2", "Lena-latin3", "Lena-latin4", "Lena-latin5",
        "Lena-shift-jis", "Lena-tis-620", "Lena-utf8")),
    *(f"Formats/{name}.dcm" for name in ("Jpeg", "JpegLossless", "Rle", "jp2k91YBR-ICT")),
    *(f"TransferSyntaxes/1.2.840.10008.{suffix}.dcm" for suffix in (
        "1.2", "1.2.1", "1.2.1.99", "1.2.2", "1.2.4.50", "1.2.4.51", "1.2.4.57", "1.2.4.70",
        "1.2.4.80", "1.2.4.81", "1.2.4.90", "1.2.4.91", "1.2.5")),
)

_STARTUP_DEADLINE_S = 60.0
_STOP_GRACE_S = 15.0


class OrthancHTTPError(Exception):
    """Orthanc answered with a non-2xx status."""

    def __init__(self, method: str, path: str, status: int, body: bytes) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:500]!r}")
        self.status = status
        self.body = body


class OrthancClient:
    """Minimal REST client (urllib only) for an Orthanc on 127.0.0.1."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._uploaded: dict[str, str] = {}

    def _call(self, method: str, path: str, body: bytes | None = None,
              content_type: str | None = None) -> bytes:
        request = urllib.request.Request(self.base_url + path, data=body, method=method)
        if content_type is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                return answer.read()
        except urllib.error.HTTPError as error:
            raise OrthancHTTPError(method, path, error.code, error.read()) from None

    def get_json(self, path: str) -> Any:
        return json.loads(self._call("GET", path))

    def post_json(self, path: str, body: Any) -> bytes:
        return self._call("POST", path, json.dumps(body).encode("utf-8"), "application/json")

    def system(self) -> dict[str, Any]:
        return self.get_json("/system")

    @property
    def version(self) -> str:
        return str(self.system()["Version"])

    def upload(self, data: bytes) -> str:
        """Store a DICOM file; returns its Orthanc instance id."""
        answer = json.loads(self._call("POST", "/instances", data, "application/dicom"))
        if isinstance(answer, list):  # a zip/multi-file answer; not used here
            raise AssertionError(f"unexpected multi-instance answer: {answer!r}")
        return str(answer["ID"])

    def upload_once(self, data: bytes) -> str:
        """Store ``data`` unless this client already did (cached by content hash)."""
        digest = hashlib.sha256(data).hexdigest()
        if digest not in self._uploaded:
            instance = self.upload(data)
            # OverwriteInstances: another file with the same identifiers (DummyCT-overwrite.dcm
            # and DummyCT.dcm) has just been replaced and must be uploaded again when needed.
            self._uploaded = {k: v for k, v in self._uploaded.items() if v != instance}
            self._uploaded[digest] = instance
        return self._uploaded[digest]

    def upload_sample(self, relative: str | Path) -> str:
        """Store ``SAMPLES/relative`` once per client."""
        return self.upload_once((SAMPLES / relative).read_bytes())

    def instance_file(self, instance_id: str) -> bytes:
        return self._call("GET", f"/instances/{instance_id}/file")

    def instance_parent(self, instance_id: str, level: str) -> str:
        """Orthanc id of the instance's parent at ``level`` ('series', 'study', 'patient')."""
        return str(self.get_json(f"/instances/{instance_id}/{level}")["ID"])

    def modify_instance(self, instance_id: str, body: dict[str, Any]) -> bytes:
        """POST /instances/{id}/modify: the modified file (not stored)."""
        return self.post_json(f"/instances/{instance_id}/modify", body)

    def anonymize_instance(self, instance_id: str, body: dict[str, Any]) -> bytes:
        """POST /instances/{id}/anonymize: the anonymized file (not stored)."""
        return self.post_json(f"/instances/{instance_id}/anonymize", body)

    def run_job(self, level: str, resource_id: str, operation: str,
                body: dict[str, Any]) -> dict[str, Any]:
        """POST /{level}/{id}/{operation} synchronously: the job content (results stored)."""
        answer = self.post_json(f"/{level}/{resource_id}/{operation}", {**body, "Synchronous": True})
        return dict(json.loads(answer))

    def modify_study(self, study_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST /studies/{id}/modify, synchronous: the job content (new study stored)."""
        return self.run_job("studies", study_id, "modify", body)

    def anonymize_study(self, study_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST /studies/{id}/anonymize, synchronous: the job content (new study stored)."""
        return self.run_job("studies", study_id, "anonymize", body)

    def upload_study(self, files: dict[str, bytes]) -> tuple[str, dict[str, str]]:
        """Store the files of one study ({label: bytes}) so that the study holds exactly them.

        Returns (Orthanc study id, {Orthanc instance id: label}). Other instances of that
        study (uploaded by other tests) are deleted, so study-level jobs see exactly ``files``.
        """
        by_id = {self.upload_once(data): label for label, data in files.items()}
        studies = {self.instance_parent(instance, "study") for instance in by_id}
        if len(studies) != 1:
            raise AssertionError(f"{sorted(files)} span {len(studies)} studies")
        [study] = studies
        for instance in self.study_instances(study):
            if instance not in by_id:
                self.delete("instances", instance)
        if set(self.study_instances(study)) != set(by_id):
            raise AssertionError(f"study {study} does not hold exactly {sorted(files)}")
        return study, by_id

    def job_results(self, job: dict[str, Any], source_level_metadata: str
                    ) -> dict[str, bytes]:
        """{source instance id: result file} for the study a job produced.

        ``source_level_metadata`` is 'ModifiedFrom' or 'AnonymizedFrom'.
        """
        if job.get("Type") != "Study":
            raise AssertionError(f"expected a Study job result, got {job!r}")
        results: dict[str, bytes] = {}
        for instance in self.study_instances(str(job["ID"])):
            source = self.metadata("instances", instance, source_level_metadata)
            if source is None:
                raise AssertionError(f"instance {instance} has no {source_level_metadata}")
            results[source] = self.instance_file(instance)
        return results

    def study_instances(self, study_id: str) -> list[str]:
        return sorted(str(item["ID"]) for item in self.get_json(f"/studies/{study_id}/instances"))

    def metadata(self, level: str, resource_id: str, name: str) -> str | None:
        try:
            return self._call("GET", f"/{level}/{resource_id}/metadata/{name}").decode("utf-8")
        except OrthancHTTPError as error:
            if error.status == 404:
                return None
            raise

    def delete(self, level: str, resource_id: str) -> None:
        self._call("DELETE", f"/{level}/{resource_id}")
        if level == "instances":
            self._uploaded = {k: v for k, v in self._uploaded.items() if v != resource_id}
        else:
            self._uploaded.clear()  # conservative: children unknown here

    def delete_all(self) -> None:
        for patient in self.get_json("/patients"):
            self._call("DELETE", f"/patients/{patient}")
        self._uploaded.clear()


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def listening_addresses(pid: int) -> set[str]:
    """'addr:port' of every TCP socket in LISTEN state owned by ``pid`` (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            address_hex, port_hex = local.split(":")
            raw = bytes.fromhex(address_hex)
            # /proc prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, width // 2, 4))
            family = socket.AF_INET if width == 8 else socket.AF_INET6
            found.add(f"{socket.inet_ntop(family, words)}:{int(port_hex, 16)}")
    return found


class OrthancProcess:
    """A running Orthanc started by these tests (``pid``, ``client``, ``log_path``)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = _free_loopback_port()
        self.log_path = workdir / "orthanc.log"
        self.config_path = workdir / "orthanc.json"
        self.shim_path = workdir / "bind_loopback.so"
        self._process: subprocess.Popen[bytes] | None = None
        self.client = OrthancClient(f"http://127.0.0.1:{self.port}")

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self) -> None:
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(self.shim_path), str(SHIM_SOURCE), "-ldl"],
            check=True, capture_output=True)
        storage = self.workdir / "storage"
        storage.mkdir()
        config = {
            "Name": "dicom-deid-reference",
            "HttpPort": self.port,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "OverwriteInstances": True,
            "SaveJobs": False,
            "Dictionary": TEST_DICTIONARY,
        }
        self.config_path.write_text(json.dumps(config, indent=2))
        env = {**os.environ, "LD_PRELOAD": str(self.shim_path)}
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [str(ORTHANC_BINARY), str(self.config_path)], cwd=self.workdir, env=env,
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + _STARTUP_DEADLINE_S
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                self.client.system()
                return
            except (OSError, OrthancHTTPError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not answer /system:\n{self.log_tail()}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def orthanc_unavailable_reason() -> str | None:
    if not ORTHANC_BINARY.exists():
        return f"{ORTHANC_BINARY} absent (apt-get install orthanc)"
    if shutil.which("gcc") is None:
        return "gcc absent: cannot build the loopback bind shim"
    return None


def _unusable(reason: str) -> NoReturn:
    """Skip (a fresh machine) or, when the reference is required, fail with ``reason``."""
    from tests.conftest import skip_unless_required

    skip_unless_required(reason, REQUIRE_ORTHANC_ENV)


_PROCESS_KEY = pytest.StashKey["OrthancProcess | str"]()


@pytest.fixture(scope="session")
def orthanc_process(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> OrthancProcess:
    """The running Orthanc 1.10.1 (skips when the binary or gcc is absent or the version is
    another; fails instead when ``DICOM_DEID_REQUIRE_ORTHANC=1``).

    Test modules import this fixture, which gives each module its own fixture definition; the
    process itself lives in the session's stash so that only one Orthanc runs per session,
    and it is stopped (by PID) when the session ends.
    """
    reason = orthanc_unavailable_reason()
    if reason is not None:
        _unusable(reason)
    stash = request.config.stash
    existing = stash.get(_PROCESS_KEY, None)
    if isinstance(existing, str):  # an earlier start failed: don't try again per module
        pytest.fail(existing)
    if existing is None:
        process = OrthancProcess(tmp_path_factory.mktemp("orthanc"))
        request.config.add_cleanup(process.stop)
        try:
            process.start()
        except (RuntimeError, subprocess.CalledProcessError) as error:
            stash[_PROCESS_KEY] = f"cannot start Orthanc: {error}"
            raise
        stash[_PROCESS_KEY] = process
        existing = process
    version = existing.client.version
    if version != REFERENCE_VERSION:
        _unusable(f"the differential tests are calibrated on Orthanc {REFERENCE_VERSION}, "
                  f"found {version}")
    return existing


@pytest.fixture(scope="session")
def orthanc(orthanc_process: OrthancProcess) -> OrthancClient:
    """A client of the session's Orthanc 1.10.1 on 127.0.0.1."""
    return orthanc_process.client
