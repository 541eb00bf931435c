"""gs:// end to end against gcp-storage-emulator on 127.0.0.1 (inputs, outputs, audit and key in buckets).

The emulator is started by the fixture on a free loopback port and stopped by its PID. Every
run is a separate ``dicom-deid`` process with ``STORAGE_EMULATOR_HOST`` set, so Beam's GCS
filesystem (built on google-cloud-storage) talks to it in the main process and in every
multi_processing worker.

Credentials: with the ``[gcp]`` extra installed, Beam's first ``gs://`` call in every process
retries ``google.auth.default()`` for ~26 s before falling back to an anonymous client. The
runs below put a ``sitecustomize.py`` on ``PYTHONPATH`` that makes Beam's credential lookup
return "anonymous" at once, in every process (workers inherit the environment).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.pipeline_support import KEY, SECRET, expected_row
from tests.synthetic import make_study, write_study
from transforms import request

EMULATOR = Path(sys.executable).with_name("gcp-storage-emulator")
ANONYMOUS_GCP_AUTH = '''\
"""Test-only: make Beam's GCP credential lookup anonymous at once (no 26 s retry stall)."""
import importlib.abc
import importlib.util
import sys


class _PatchBeamAuth(importlib.abc.MetaPathFinder):
    NAME = "apache_beam.internal.gcp.auth"

    def find_spec(self, name, path, target=None):
        if name != self.NAME:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)

            def _anonymous(pipeline_options):
                return None

            module._Credentials._get_service_credentials = staticmethod(_anonymous)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchBeamAuth())
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _gcs_server(argv: list[str], port: int, home: Path, name: str) -> Iterator[tuple[str, dict]]:
    """Start a GCS emulator on 127.0.0.1:``port``; ``(host URL, env for child processes)``.
    Stopped by its PID."""
    log = open(home / "emulator.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=home)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{name} did not start: {(home / 'emulator.log').read_text()}")
                time.sleep(0.1)
        site = home / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(ANONYMOUS_GCP_AUTH)
        host = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if k not in ("DICOM_DEID_KEY", "GOOGLE_APPLICATION_CREDENTIALS")}
        env.update(
            STORAGE_EMULATOR_HOST=host,
            PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
            GOOGLE_CLOUD_PROJECT="test-project",
            NO_GCE_CHECK="true",
        )
        yield host, env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory):
    """gcp-storage-emulator: ``(host URL, env for child processes)``; buckets are created by the
    tests. It serves everything Beam uses (batch copy/delete included) but does not enforce
    generation preconditions."""
    if not EMULATOR.exists():
        pytest.skip("gcp-storage-emulator is not installed (pip install -e '.[test]')")
    port = _free_port()
    argv = [str(EMULATOR), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--quiet"]
    with _gcs_server(argv, port, tmp_path_factory.mktemp("gcs"), "gcp-storage-emulator") as served:
        yield served


@contextlib.contextmanager
def storage_client(host: str) -> Iterator[Any]:
    """A google-cloud-storage client on the emulator at ``host`` (STORAGE_EMULATOR_HOST is set
    while it is in use, then restored)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = host
    try:
        yield storage.Client(project="test-project", credentials=AnonymousCredentials())
    finally:
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved


@pytest.fixture(scope="module")
def gcs(emulator):
    with storage_client(emulator[0]) as client:
        yield client


def _upload_folder(gcs, bucket: str, prefix: str, folder: Path) -> dict[str, Path]:
    b = gcs.bucket(bucket)
    uploaded = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            name = f"{prefix}/{path.relative_to(folder).as_posix()}"
            b.blob(name).upload_from_filename(str(path))
            uploaded[f"gs://{bucket}/{name}"] = path
    return uploaded


def _objects(gcs, bucket: str, prefix: str) -> dict[str, bytes]:
    return {f"gs://{bucket}/{blob.name}": blob.download_as_bytes() for blob in gcs.list_blobs(bucket, prefix=prefix)}


def _read_audit(gcs, bucket: str, prefix: str) -> list[dict]:
    import pyarrow as pa

    tables = [
        pq.read_table(io.BytesIO(data))
        for name, data in _objects(gcs, bucket, prefix).items()
        if name.endswith(".parquet")
    ]
    return sorted(pa.concat_tables(tables).to_pylist(), key=lambda r: r["source_uri"])


def _dicom_deid(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).with_name("dicom-deid")), *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.parametrize("mode", ["in_memory", "multi_processing"])
def test_bucket_to_bucket(tmp_path: Path, emulator, gcs, mode: str):
    _, env = emulator
    tag = mode.replace("_", "-")
    for name in (f"in-{tag}", f"out-{tag}", f"keys-{tag}"):
        gcs.create_bucket(name)
    local = tmp_path / "in"
    write_study(make_study(seed=11, n_ct=2), local / "study")
    (local / "study" / "readme.txt").write_text("not DICOM")
    uploaded = _upload_folder(gcs, f"in-{tag}", "archive", local)
    gcs.bucket(f"keys-{tag}").blob("deid.key").upload_from_string(SECRET + b"\n")
    beam_args = ["--direct_running_mode", mode] + (["--direct_num_workers", "2"] if mode == "multi_processing" else [])
    done = _dicom_deid(
        env,
        "anonymize",
        f"gs://in-{tag}/archive",
        f"gs://out-{tag}/deid",
        "--key-file",
        f"gs://keys-{tag}/deid.key",
        "--crosswalk",
        f"gs://keys-{tag}/crosswalk",
        *beam_args,
    )
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    summary = json.loads(done.stdout)
    assert (summary["InstancesCount"], summary["FailedInstancesCount"], summary["Reasons"]) == (5, 1, {"not_dicom": 1})
    assert (summary["KeyId"], summary["Audit"]) == (KEY.key_id, f"gs://out-{tag}/deid-audit")
    # outputs: exactly what the core makes of each input, under gs://out/deid/<study>/<series>/<sop>.dcm
    plan = request.parse_anonymize({})
    objects = _objects(gcs, f"out-{tag}", "deid/")
    import hashlib

    expected = {}
    for path in uploaded.values():
        exp = expected_row(path, plan)
        if exp["status"] == "written":
            expected[f"gs://out-{tag}/deid/{exp['name']}"] = exp["output_sha256"]
    assert {k: hashlib.sha256(v).hexdigest() for k, v in objects.items()} == expected  # no temporaries left
    rows = _read_audit(gcs, f"out-{tag}", "deid-audit/")
    assert [r["source_uri"] for r in rows] == sorted(uploaded)
    assert {r["output_uri"]: r["output_sha256"] for r in rows if r["status"] == "written"} == expected
    assert [(r["status"], r["reason"]) for r in rows if r["source_uri"].endswith("readme.txt")] == [("failed", "not_dicom")]
    stored_summary = json.loads(_objects(gcs, f"out-{tag}", "deid-audit/summary.json")[f"gs://out-{tag}/deid-audit/summary.json"])
    assert stored_summary == summary
    cross = _read_audit(gcs, f"keys-{tag}", "crosswalk/")
    assert len(cross) == 4  # written files only
    assert {c["original_patient_id"] for c in cross} == {"PID-PLANTED-0001"}
    if mode != "in_memory":
        return
    # rerun: same objects, every input's fate unchanged (idempotent publishing on GCS)
    again = _dicom_deid(env, "anonymize", f"gs://in-{tag}/archive", f"gs://out-{tag}/deid", "--key-file", f"gs://keys-{tag}/deid.key", "--quiet", *beam_args)
    assert again.returncode == 3, again.stderr
    assert {k: hashlib.sha256(v).hexdigest() for k, v in _objects(gcs, f"out-{tag}", "deid/").items()} == expected
    rows = _read_audit(gcs, f"out-{tag}", "deid-audit/")
    runs = sorted({r["run_id"] for r in rows})
    assert len(runs) == 2
    fates = [sorted((r["source_uri"], r["status"], r["output_uri"]) for r in rows if r["run_id"] == run) for run in runs]
    assert fates[0] == fates[1]


def test_sitecustomize_makes_beam_auth_anonymous(tmp_path: Path, emulator):
    _, env = emulator
    probe = (
        "import logging, sys\n"
        "import apache_beam.internal.gcp.auth as auth\n"
        "fn = auth._Credentials._get_service_credentials\n"
        "print(fn.__name__, fn(None))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip() == "_anonymous None", done.stderr


_LISTING_PROBE = """
import json, sys
from apache_beam.io.filesystems import FileSystems
from transforms.beam import _match_streaming, expand_input

patterns = json.loads(sys.argv[1])
reference = {p: sorted([m.path, m.size_in_bytes] for m in FileSystems.match([p])[0].metadata_list) for p in patterns}

def no_match(*args, **kwargs):
    raise AssertionError("gs:// listing went through FileSystems.match")

FileSystems.match = no_match
streamed = {p: sorted([path, size] for path, size in _match_streaming(p)) for p in patterns}
folder = sorted([path, size] for path, size in expand_input(patterns[0].rsplit("/", 1)[0]))

def fanned_out(uri):
    from apache_beam import pvalue
    from transforms.beam import ExpandInputFn, ListPrefixFn, PREFIX_TAG

    files, prefixes = [], []
    for out in ExpandInputFn().process(uri):
        if isinstance(out, pvalue.TaggedOutput):
            assert out.tag == PREFIX_TAG
            prefixes.append(out.value[1])
            files += ListPrefixFn().process(out.value)
        else:
            files.append(out)
    return sorted([path, size] for path, size in files), prefixes

fanned = {p: fanned_out(p) for p in patterns}
print(json.dumps({"reference": reference, "streamed": streamed, "folder": folder, "fanned": fanned}))
"""


def _run_probe(script: str, argument: Any, env: dict) -> Any:
    """Run a listing probe in a process of its own (against the emulator ``env`` names) with
    ``argument`` as JSON; what it printed last, as JSON."""
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(argument)], capture_output=True, text=True, env=env, timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_gcs_listing_streams_and_matches_beam(tmp_path: Path, emulator, gcs):
    """``gs://`` INPUT is listed page by page (never one list of every object, as Beam's match
    builds), with exactly the objects Beam's match would give for the same pattern."""
    _, env = emulator
    bucket = gcs.create_bucket("listing")
    names = [f"x/a/{i:04d}.dcm" for i in range(1203)] + ["x/a/deep/z.dcm", "x/b/two.dcm", "x/b/t o.txt", "x/bb.dcm", "y/other.dcm"]
    for i, name in enumerate(names):
        bucket.blob(name).upload_from_string(b"v" * (i % 5))
    bucket.blob("x/folder/").upload_from_string(b"")  # a console-made "folder" placeholder
    base = "gs://listing/x"
    patterns = [f"{base}/**", f"{base}/*", f"{base}/**.dcm", f"{base}/*/*.dcm", f"{base}/b/t?o.dcm", f"{base}/[ab]/*.dcm",
                f"{base}/a/000*", f"{base}/missing/**"]  # fmt: skip
    found = _run_probe(_LISTING_PROBE, patterns, env)
    assert found["streamed"] == found["reference"]
    # The pipeline's listing: one level here, each deeper prefix listed by another worker.
    # Placeholders ("x/folder/") are never input; everything else is what Beam matches.
    without_placeholders = {p: [e for e in ref if not e[0].endswith("/")] for p, ref in found["reference"].items()}
    assert {p: files for p, (files, _) in found["fanned"].items()} == without_placeholders
    assert found["fanned"][f"{base}/**"][1] == [f"{base}/a/", f"{base}/b/", f"{base}/folder/"]
    assert found["fanned"][f"{base}/a/000*"][1] == []  # no deeper prefix under x/a/000
    assert len(found["reference"][f"{base}/**"]) == 1203 + 4 + 1  # a/deep/z, b/two, b/"t o", bb; Beam lists the placeholder too
    assert found["reference"][f"{base}/missing/**"] == []
    # A folder INPUT: every object under the prefix, without the placeholder.
    assert [p for p, _ in found["folder"]] == sorted(f"gs://listing/{n}" for n in names if n.startswith("x/"))


_LISTING_CALLS_PROBE = """
import json, sys
import transforms.beam as deid_beam
import transforms.files as files

real = files._gcs_client
calls = []

class Spy:
    def __init__(self, client):
        self._client = client

    def list_blobs(self, bucket, **kwargs):
        if kwargs.get("max_results") != 1:  # (not _remote_glob's look for a literal name)
            calls.append([kwargs.get("prefix"), kwargs.get("delimiter")])
        return self._client.list_blobs(bucket, **kwargs)

files._gcs_client = deid_beam._gcs_client = lambda uri: Spy(real(uri))

def fanned_out(uri):
    from apache_beam import pvalue

    found = []
    for out in deid_beam.ExpandInputFn().process(uri):
        found += deid_beam.ListPrefixFn().process(out.value) if isinstance(out, pvalue.TaggedOutput) else [out]
    return sorted(found)

result = {}
for pattern in json.loads(sys.argv[1]):
    calls.clear()
    streamed = sorted(files._match_streaming(pattern))
    streamed_calls = sorted(calls)
    calls.clear()
    fanned = fanned_out(pattern)
    result[pattern] = [streamed, streamed_calls, fanned, sorted(calls)]
print(json.dumps(result))
"""


def test_gcs_listing_never_descends_where_the_pattern_cannot_match(emulator, gcs):
    """``*``, ``?`` and sets never cross a ``/``: ``gs://b/x/*`` used to list every object under
    every "folder" of x/ (a bucket of millions to find a few), and ``x/*/*.dcm`` everything
    below x/a/, x/b/... Now a folder is listed only where objects of the pattern may lie, and
    only as deep as they may lie; ``**`` lists everything below, page by page."""
    _, env = emulator
    bucket = gcs.create_bucket("pruned")
    names = ["x/top.dcm", "x/a/1.dcm", "x/a/deep/2.dcm", "x/a/deep/er/3.dcm", "x/b/4.dcm", "x/c/5.dcm", "y/6.dcm"]
    for name in names:
        bucket.blob(name).upload_from_string(b"v")
    base = "gs://pruned/x"
    # Beam's "?" and negated sets match a "/" too ("a?deep" is a/deep): no pruning there.
    patterns = [f"{base}/*", f"{base}/*/*.dcm", f"{base}/[ab]/*.dcm", f"{base}/**", f"{base}/a/*/*.dcm",
                f"{base}/a?deep/2.dcm", f"{base}/[!ab]??.dcm", f"{base}/c/[?].dcm"]  # fmt: skip
    found = _run_probe(_LISTING_CALLS_PROBE, patterns, env)
    for pattern, (streamed, _, fanned, _) in found.items():
        assert fanned == streamed, pattern  # the pipeline's fan-out lists the same objects
    listed = {p: [path[len(base) + 1:] for path, _ in streamed] for p, (streamed, *_) in found.items()}
    assert listed == {
        f"{base}/*": ["top.dcm"],
        f"{base}/*/*.dcm": ["a/1.dcm", "b/4.dcm", "c/5.dcm"],
        f"{base}/[ab]/*.dcm": ["a/1.dcm", "b/4.dcm"],
        f"{base}/**": ["a/1.dcm", "a/deep/2.dcm", "a/deep/er/3.dcm", "b/4.dcm", "c/5.dcm", "top.dcm"],
        f"{base}/a/*/*.dcm": ["a/deep/2.dcm"],
        f"{base}/a?deep/2.dcm": ["a/deep/2.dcm"],
        f"{base}/[!ab]??.dcm": ["c/5.dcm", "top.dcm"],
        f"{base}/c/[?].dcm": [],
    }
    one_level = {
        f"{base}/*": [["x/", "/"]],
        f"{base}/*/*.dcm": [["x/", "/"], ["x/a/", "/"], ["x/b/", "/"], ["x/c/", "/"]],
        f"{base}/[ab]/*.dcm": [["x/", "/"], ["x/a/", "/"], ["x/b/", "/"]],
        f"{base}/**": [["x/", "/"], ["x/a/", None], ["x/b/", None], ["x/c/", None]],
        f"{base}/a/*/*.dcm": [["x/a/", "/"], ["x/a/deep/", "/"]],
        f"{base}/a?deep/2.dcm": [["x/a", "/"], ["x/a/", None]],
        f"{base}/[!ab]??.dcm": [["x/", "/"], ["x/a/", None], ["x/b/", None], ["x/c/", None]],
        f"{base}/c/[?].dcm": [["x/c/?.dcm", "/"]],  # an escaped "?" is itself: its name is listed
    }
    assert {p: calls for p, (_, calls, _, _) in found.items()} == one_level
    assert {p: calls for p, (_, _, _, calls) in found.items()} == one_level


_LITERAL_PROBE = """
import json, sys
from apache_beam import pvalue
from transforms.beam import ExpandInputFn, ListPrefixFn, expand_input

def fanned_out(uri):
    files = []
    for out in ExpandInputFn().process(uri):
        files += ListPrefixFn().process(out.value) if isinstance(out, pvalue.TaggedOutput) else [out]
    return sorted(files)

uris = json.loads(sys.argv[1])
print(json.dumps({u: [sorted(expand_input(u)), fanned_out(u)] for u in uris}))
"""


def test_an_escaped_name_matches_only_itself_and_is_listed_from_its_literal_start():
    """The pattern a literal ``gs://`` prefix becomes (Beam's syntax has no quoting: ``[[]``)."""
    import warnings

    from apache_beam.io.filesystem import FileSystem

    from transforms import files

    for folder, other in (("gs://b/scan[1]/", "gs://b/scan1/"), ("gs://b/a*b?c[d]/", "gs://b/aXbYcd/"),
                          ("gs://b/plain/", "gs://b/plainer/")):  # fmt: skip
        pattern = files._escape_glob(folder) + "**"
        matches = files.pattern_matcher(pattern)
        assert matches(folder + "deep/x.dcm") and not matches(other + "deep/x.dcm")
        assert files.listing_prefix(pattern) == folder
    for glob in ("gs://b/x/[ab]/*.dcm", "gs://b/**/a?.dcm", "gs://b/[!x]*/y", "gs://b/t[", "gs://b/a.b+c(d)", "gs://b/[]]x",
                 "gs://b/[!]]x"):  # fmt: skip
        # Beam's own, but "*" stops at "/" only (Beam's also at a backslash)
        assert files.pattern_matcher(glob).__self__.pattern == \
            FileSystem.translate_pattern(glob).replace("[^/\\\\]*", "[^/]*")
    with warnings.catch_warnings():  # a user's own "[" inside a set: Beam's translation, Python's warning
        warnings.simplefilter("ignore", FutureWarning)
        matches = files.pattern_matcher("gs://b/[[*]/x")  # a set of "[" and "*", not an escaped "*"
    assert matches("gs://b/*/x") and matches("gs://b/[/x") and not matches("gs://b/[*]/x")
    star = files.pattern_matcher("gs://b/*.dcm")  # a Windows upload's name is one object name
    assert star("gs://b/study\\IMG1.dcm") and not star("gs://b/study/IMG1.dcm")
    assert files.listing_prefix("gs://b/x/[ab]/*.dcm") == "gs://b/x/"  # a real glob stops the prefix
    assert files.listing_prefix("gs://b/x/a?.dcm") == "gs://b/x/a"


def test_gcs_names_with_glob_characters_are_taken_literally_when_they_exist(emulator, gcs):
    """``gs://b/scan[1]/`` is that prefix when objects lie under it, and ``gs://b/x*y.dcm`` that
    object when it exists, as a local folder or file of such a name is (they used to be
    patterns: ``scan[1]/`` matched nothing and the run was refused, ``x*y.dcm`` took
    ``xzy.dcm`` too); a name that exists in neither way stays a glob."""
    _, env = emulator
    bucket = gcs.create_bucket("literal")
    names = ["in/scan[1]/a.dcm", "in/scan[1]/deep/b.dcm", "in/scan1/c.dcm", "in/x*y.dcm", "in/xzy.dcm", "in/q?/d.dcm",
             "in/qq/e.dcm"]  # fmt: skip
    for name in names:
        bucket.blob(name).upload_from_string(b"v")
    # One object, with its own size: its name used to be matched as a glob for the size (the
    # first object "st*r" matches, "st(r"; "[2]" matching "2": none, a listing error).
    for name, size in (("in/st(r.dcm", 5000), ("in/st*r.dcm", 3), ("in/scan[2].dcm", 7)):
        bucket.blob(name).upload_from_string(b"v" * size)
    base = "gs://literal/in"
    uris = [f"{base}/scan[1]/", f"{base}/scan[1]", f"{base}/scan[12]/**", f"{base}/x*y.dcm", f"{base}/x?y.dcm",
            f"{base}/q?", f"{base}/q[q]/*", f"{base}/st*r.dcm", f"{base}/scan[2].dcm"]  # fmt: skip
    found = _run_probe(_LITERAL_PROBE, uris, env)
    assert {u: fanned for u, (_, fanned) in found.items()} == {u: s for u, (s, _) in found.items()}  # the same
    assert found[f"{base}/st*r.dcm"][0] == [[f"{base}/st*r.dcm", 3]]
    assert found[f"{base}/scan[2].dcm"][0] == [[f"{base}/scan[2].dcm", 7]]
    listed = {u: [path for path, _ in streamed] for u, (streamed, _) in found.items()}
    assert listed == {
        f"{base}/scan[1]/": [f"{base}/scan[1]/a.dcm", f"{base}/scan[1]/deep/b.dcm"],
        f"{base}/scan[1]": [f"{base}/scan[1]/a.dcm", f"{base}/scan[1]/deep/b.dcm"],
        f"{base}/scan[12]/**": [f"{base}/scan1/c.dcm"],  # no such prefix: a glob
        f"{base}/x*y.dcm": [f"{base}/x*y.dcm"],
        f"{base}/x?y.dcm": [f"{base}/x*y.dcm", f"{base}/xzy.dcm"],
        f"{base}/q?": [f"{base}/q?/d.dcm"],
        f"{base}/q[q]/*": [f"{base}/qq/e.dcm"],
        f"{base}/st*r.dcm": [f"{base}/st*r.dcm"],
        f"{base}/scan[2].dcm": [f"{base}/scan[2].dcm"],
    }


def test_bucket_root_trailing_slash_prefix_and_empty_prefix(tmp_path: Path, emulator, gcs):
    """A whole bucket as INPUT (used to end with "GCS path must be in the form gs://<bucket>/
    <object>"), a prefix written with a slash where an object of the same name exists (used to
    process that object only), and a prefix that matches nothing (refused before the audit
    folder's last summary.json is replaced)."""
    _, env = emulator
    for name in ("root-in", "root-out"):
        gcs.create_bucket(name)
    local = tmp_path / "in"
    write_study(make_study(seed=12, n_ct=2, rtstruct=False, sr=False), local / "x")
    uploaded = _upload_folder(gcs, "root-in", "x", local / "x")  # "x/..." objects at the bucket's root
    gcs.bucket("root-in").blob("x").upload_from_string(b"an object named like the prefix")
    key = tmp_path / "deid.key"
    key.write_bytes(SECRET)
    whole = _dicom_deid(env, "anonymize", "gs://root-in", "gs://root-out/all", "--key-file", str(key), "--quiet")
    assert whole.returncode == 3, whole.stderr  # the object "x" is not DICOM
    rows = _read_audit(gcs, "root-out", "all-audit/")
    assert sorted(r["source_uri"] for r in rows) == sorted([*uploaded, "gs://root-in/x"])
    prefix = _dicom_deid(env, "anonymize", "gs://root-in/x/", "gs://root-out/prefix", "--key-file", str(key), "--quiet")
    assert prefix.returncode == 0, prefix.stderr
    assert len(_read_audit(gcs, "root-out", "prefix-audit/")) == len(uploaded)
    empty = _dicom_deid(env, "anonymize", "gs://root-in/nothing-here", "gs://root-out/all", "--key-file", str(key), "--quiet")
    assert (empty.returncode, empty.stderr) == (2, "dicom-deid: INPUT 'gs://root-in/nothing-here' matched no files\n")
    assert len(_read_audit(gcs, "root-out", "all-audit/")) == len(rows)  # no new shard, summary kept


def test_an_audit_bucket_that_cannot_be_written_is_refused_before_any_output(tmp_path: Path, emulator, gcs):
    """It used to be found after every output was written: the run then ended without rows."""
    _, env = emulator
    for name in ("probe-in", "probe-out"):
        gcs.create_bucket(name)
    local = tmp_path / "in"
    write_study(make_study(seed=13, n_ct=1, rtstruct=False, sr=False), local)
    _upload_folder(gcs, "probe-in", "a", local)
    key = tmp_path / "deid.key"
    key.write_bytes(SECRET)
    for option in ("--audit", "--crosswalk"):
        done = _dicom_deid(env, "anonymize", "gs://probe-in/a", "gs://probe-out/deid", "--key-file", str(key),
                           option, "gs://no-such-bucket-here/x")
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"dicom-deid: {option} 'gs://no-such-bucket-here/x': cannot write there (")
        assert done.stderr.count("\n") == 1
        assert _objects(gcs, "probe-out", "") == {}
    fine = _dicom_deid(env, "anonymize", "gs://probe-in/a", "gs://probe-out/deid", "--key-file", str(key), "--quiet")
    assert fine.returncode == 0, fine.stderr
    assert not [name for name in _objects(gcs, "probe-out", "") if ".dicom-deid-probe" in name]


def test_gcs_folders_of_an_earlier_run_keep_their_own_kind(tmp_path: Path, emulator, gcs):
    """As local folders do (tests/test_cli.py): a prefix that an earlier run filled with a
    crosswalk, an audit or de-identified files is refused as another kind of folder, before
    anything is written (a release next to original identifiers used to be exit 0)."""
    _, env = emulator
    for name in ("kind-in", "kind-out"):
        gcs.create_bucket(name)
    write_study(make_study(seed=14, n_ct=1, rtstruct=False, sr=False), tmp_path / "in")
    _upload_folder(gcs, "kind-in", "a", tmp_path / "in")
    key = tmp_path / "deid.key"
    key.write_bytes(SECRET)
    run = ["anonymize", "gs://kind-in/a", "--key-file", str(key), "--quiet"]
    first = _dicom_deid(env, *run, "gs://kind-out/rel1", "--crosswalk", "gs://kind-out/cw")
    assert first.returncode == 0, first.stderr
    before = _objects(gcs, "kind-out", "")
    own = " (keep original identifiers apart)"
    cases = [
        (["gs://kind-out/cw"], "OUTPUT 'gs://kind-out/cw' already holds a crosswalk of an earlier run: give OUTPUT a "
                               "folder of its own" + own),
        (["gs://kind-out/rel2", "--crosswalk", "gs://kind-out/rel1"],  # study "folders" named by their UIDs
         "--crosswalk 'gs://kind-out/rel1' already holds de-identified DICOM files of an earlier run: give "
         "--crosswalk a folder of its own" + own),
        (["gs://kind-out/rel1-audit"], "OUTPUT 'gs://kind-out/rel1-audit' already holds an audit of an earlier run: "
                                       "give OUTPUT a folder of its own"),
        (["gs://kind-out/rel3", "--audit", "gs://kind-out/cw"],
         "--audit 'gs://kind-out/cw' already holds a crosswalk of an earlier run: give --audit a folder of its own"
         + own),
    ]
    for extra, message in cases:
        done = _dicom_deid(env, *run, *extra)
        assert (done.returncode, done.stderr) == (2, f"dicom-deid: {message}\n"), extra
    assert _objects(gcs, "kind-out", "") == before
    again = _dicom_deid(env, *run, "gs://kind-out/rel1", "--crosswalk", "gs://kind-out/cw")
    assert again.returncode == 0, again.stderr
