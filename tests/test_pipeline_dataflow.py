"""Dataflow: the pipeline builds with DataflowRunner options and packages itself, without network.

Nothing is submitted. The graph is checked through its portable proto (what Dataflow receives);
the DoFn is unpickled from that proto to prove a ``gs://`` key file stays out of it. With the
``[gcp]`` extra installed, a ``--dry_run`` goes through DataflowRunner.run_pipeline up to the
job description (skipped otherwise).
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import GoogleCloudOptions, SetupOptions, StandardOptions
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2

from pipelines import cli
from pipelines import run as pipeline_run
from tests.pipeline_support import KEY, SECRET
from transforms import request
from transforms.beam import DeidentifyFn, RunConfig

REPO = Path(__file__).resolve().parents[1]
DATAFLOW_ARGS = [
    "--runner",
    "DataflowRunner",
    "--project",
    "deid-test-project",
    "--region",
    "europe-west1",
    "--temp_location",
    "gs://deid-temp-bucket/tmp",
    "--setup_file",
    str(REPO / "pyproject.toml"),
    "--sdk_location",
    "container",
    # TestOptions: Beam skips its online checks (bucket soft-delete policy lookups that would
    # otherwise retry for two minutes here) and DataflowRunner never submits.
    "--dry_run",
    "True",
]


def _config(**overrides) -> RunConfig:
    fields = dict(
        plan=request.parse_anonymize({"DicomVersion": "2021b"}),
        output_root="gs://deid-out/deid",
        run_id="run-1",
        key_id=KEY.key_id,
        key_uri="gs://deid-keys/deid.key",
        crosswalk=True,
    )
    fields.update(overrides)
    return RunConfig(**fields)


def _build(cfg: RunConfig, args=DATAFLOW_ARGS):
    options = pipeline_run.pipeline_options(list(args))
    pipeline = pipeline_run.make_pipeline(options)
    pipeline_run.build(pipeline, "gs://deid-in/archive", cfg, "gs://deid-out/deid-audit", "gs://deid-keys/crosswalk")
    return options, pipeline


def _dofns(proto: beam_runner_api_pb2.Pipeline) -> list[object]:
    found = []
    for transform in proto.components.transforms.values():
        if transform.spec.urn == common_urns.primitives.PAR_DO.urn:
            payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
            try:
                fn = pickler.loads(payload.do_fn.payload)
            except Exception:  # noqa: BLE001 - non-Python (e.g. runner-native) payloads
                continue
            found.append(fn[0] if isinstance(fn, tuple) else fn)
    return found


def test_dataflow_graph_builds_without_running():
    options, pipeline = _build(_config())
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    gcp = options.view_as(GoogleCloudOptions)
    assert (gcp.project, gcp.region, gcp.temp_location) == ("deid-test-project", "europe-west1", "gs://deid-temp-bucket/tmp")
    assert options.view_as(SetupOptions).setup_file == str(REPO / "pyproject.toml")
    proto = pipeline.to_runner_api()
    (root,) = proto.root_transform_ids
    top = {proto.components.transforms[t].unique_name for t in proto.components.transforms[root].subtransforms}
    assert top == {"Input", "ExpandInput", "DeidentifyInstances", "WriteAudit", "WriteCrosswalk"}
    names = {t.unique_name for t in proto.components.transforms.values()}
    assert {"ExpandInput/MatchFiles", "ExpandInput/SpreadFiles", "DeidentifyInstances/Deidentify"} <= names
    assert {"ExpandInput/SpreadPrefixes", "ExpandInput/ListPrefixes"} <= names  # a gs:// INPUT is listed in parallel
    # the only shuffles: the (path, size) and first-level prefix reshuffles and the Parquet
    # sinks' finalisation
    gbk = sorted(
        t.unique_name for t in proto.components.transforms.values() if t.spec.urn == common_urns.primitives.GROUP_BY_KEY.urn
    )
    assert gbk and all(n.startswith(("ExpandInput/SpreadFiles/", "ExpandInput/SpreadPrefixes/", "WriteAudit/", "WriteCrosswalk/")) for n in gbk)
    assert not any(n.startswith("DeidentifyInstances/") for n in gbk)
    # the DoFn Dataflow would receive carries the key file's URI, not the key
    (fn,) = [f for f in _dofns(proto) if isinstance(f, DeidentifyFn)]
    assert fn._cfg.key is None
    assert (fn._cfg.key_uri, fn._cfg.key_id, fn._cfg.output_root) == ("gs://deid-keys/deid.key", KEY.key_id, "gs://deid-out/deid")
    assert fn._cfg.plan == request.parse_anonymize({"DicomVersion": "2021b"})
    assert SECRET not in proto.SerializeToString()


def test_inline_key_travels_inside_the_graph():
    """Why gs:// key files matter on Dataflow: an env/local key is pickled into the job."""
    _, pipeline = _build(_config(key=KEY, key_uri=None))
    (fn,) = [f for f in _dofns(pipeline.to_runner_api()) if isinstance(f, DeidentifyFn)]
    assert fn._cfg.key == KEY
    assert repr(fn._cfg) == "RunConfig(output_root='gs://deid-out/deid', run_id='run-1', key_id='%s')" % KEY.key_id


def test_invalid_dataflow_options_are_refused_up_front():
    args = [a if a != "deid-test-project" else "p" for a in DATAFLOW_ARGS]
    assert args != DATAFLOW_ARGS
    with pytest.raises(pipeline_run.InvalidOptions, match=r"^Beam options: Pipeline has validations errors: Invalid Project ID \(p\)"):
        _build(_config(), args)


def test_anonymize_command_refuses_invalid_dataflow_options_before_reading_anything(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """One line, exit 2, before the last summary in gs:// OUTPUT is read (offline, that read
    retried for two minutes before the refusal)."""
    monkeypatch.setattr(cli, "load_key", lambda _file: (KEY, "gs://deid-keys/deid.key"))  # no network
    monkeypatch.setattr(cli, "other_key_warning", lambda *_: pytest.fail("read the last summary before refusing"))
    args = [a if a != "deid-test-project" else "p" for a in DATAFLOW_ARGS]
    code = cli.main(["anonymize", "gs://deid-in/archive", "gs://deid-out/o", "--key-file", "gs://deid-keys/deid.key",
                     "--quiet", *args])  # fmt: skip
    assert code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("dicom-deid: Beam options: Pipeline has validations errors: Invalid Project ID (p)")
    assert err.count("\n") == 1


def test_setup_file_packages_the_code_for_workers(tmp_path: Path):
    """Beam's stager builds the sdist Dataflow workers install (PEP 517, offline)."""
    # Python 3.12+ venvs come without setuptools; the gcp extra installs it (CI has it).
    pytest.importorskip("setuptools", reason="building the sdist for Dataflow needs the gcp extra (setuptools)")
    from apache_beam.runners.portability.stager import Stager

    options = pipeline_run.pipeline_options(list(DATAFLOW_ARGS))
    out = tmp_path / "build"
    out.mkdir()
    # Beam runs `python -m build --no-isolation --sdist` itself when `build` is installed; here
    # the same PEP 517 build runs first (offline, setuptools only) and the stager picks it up.
    # Built from a copy of what a clone holds: setuptools adds the files an earlier build's
    # egg-info listed (SOURCES.txt), which would hide a package the configuration leaves out.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(REPO / name, source / name)
    for package in ("pipelines", "transforms", "schemas"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-c", "import sys, setuptools.build_meta as b; b.build_sdist(sys.argv[1])", str(out)],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=300,
    )
    resources = Stager.create_job_resources(options, str(out), build_setup_args=["unused"])
    staged = {r.role_payload for r in resources}
    names = set()
    for r in resources:
        from apache_beam.portability.api import beam_runner_api_pb2 as pb

        payload = pb.ArtifactStagingToRolePayload.FromString(r.role_payload)
        names.add(payload.staged_name)
    assert "workflow.tar.gz" in names, staged
    (sdist,) = out.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
        tar.extractall(tmp_path / "unpacked", filter="data")
    # What workers install is the wheel pip builds from that sdist: every module and data file
    # of the three packages, sub-packages included, and no test (they need the repository).
    code = {str(p.relative_to(REPO)) for package in ("pipelines", "transforms", "schemas")
            for p in (REPO / package).rglob("*") if p.suffix in (".py", ".json") and "__pycache__" not in p.parts}
    assert "transforms/data/profiles.json" in code and "transforms/engine.py" in code
    assert code <= members, sorted(code - members)
    assert not [m for m in members if m.startswith(("tests/", "benchmarks/"))]
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    wheels = tmp_path / "wheel"
    wheels.mkdir()
    subprocess.run(
        [sys.executable, "-c", "import sys, setuptools.build_meta as b; b.build_wheel(sys.argv[1])", str(wheels)],
        cwd=unpacked, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        installed = {name for name in archive.namelist() if ".dist-info/" not in name}
    assert installed == code, (sorted(code - installed), sorted(installed - code))


@pytest.mark.skipif(
    importlib.util.find_spec("apache_beam.runners.dataflow.internal.apiclient") is None
    or importlib.util.find_spec("google.cloud.dataflow") is None,
    reason="DataflowRunner's job client needs the [gcp] extra",
)
def test_dataflow_dry_run_builds_the_job(tmp_path: Path):
    """Through DataflowRunner.run_pipeline up to the job description; nothing is submitted."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("--setup_file with pyproject.toml needs the 'build' package")
    options, pipeline = _build(_config())
    result = pipeline.run()
    assert str(result.state) == "DONE"
    assert result.job.proto.name.startswith("beamapp-")
    proto = pipeline.runner.proto_pipeline
    (env,) = proto.components.environments.values()
    staged = set()
    for dep in env.dependencies:
        from apache_beam.portability.api import beam_runner_api_pb2 as pb

        staged.add(pb.ArtifactStagingToRolePayload.FromString(dep.role_payload).staged_name)
    assert "workflow.tar.gz" in staged


def _readme_dataflow_argv() -> list[str]:
    """The arguments of the README's "On Google Cloud Dataflow" command, after ``dicom-deid``."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("### On Google Cloud Dataflow\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    [command] = [line for line in block.replace("\\\n", " ").splitlines() if line.startswith("dicom-deid ")]
    return shlex.split(command)[1:]


def test_readme_dataflow_command_builds_the_job_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]):
    """The README's command, as the CLI would take it up to the run: every option known, the
    request and locations accepted, a gs:// key file (the only key a remote runner takes), and
    the graph Dataflow would receive reads the key from that file."""
    argv = _readme_dataflow_argv()
    assert "--key-file" in argv and "DataflowRunner" in argv  # the block found is the right one
    monkeypatch.chdir(REPO)  # the README runs it from the checkout: --config and --setup_file are relative
    args, beam_args = cli.build_parser().parse_known_args(argv)
    assert (args.command, args.input, args.output, args.key_file, args.audit) == (
        "anonymize", "gs://my-bucket/incoming/**", "gs://my-bucket/deid/", "gs://my-secrets/deid.key",
        "gs://my-bucket/deid-audit/")  # fmt: skip
    body, dictionary = cli.load_request(args.body, args.config)
    plan = cli.parse_plan(args.command, body, dictionary, None)
    assert plan == request.parse_anonymize(json.loads((REPO / "configs" / "anonymize-2023b.json").read_text()))
    input_uri, output, audit = (cli.normalize(u) for u in (args.input, args.output, args.audit))
    cli.check_locations(input_uri, output, audit, None)
    options = pipeline_run.pipeline_options(beam_args)  # no unknown option
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    gcp = options.view_as(GoogleCloudOptions)
    assert (gcp.project, gcp.region, gcp.temp_location) == ("my-project", "europe-west1", "gs://my-bucket/tmp/")
    assert options.view_as(SetupOptions).setup_file == "./pyproject.toml"
    # Why the README gives a gs:// key: the same command with a local key file is refused
    # before anything runs (the key would be pickled into the job description).
    assert not cli.key_may_travel(options)
    local_key = tmp_path / "deid.key"
    local_key.write_bytes(SECRET)
    assert cli.main([str(local_key) if a == args.key_file else a for a in argv]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith(
        "dicom-deid: --runner DataflowRunner runs on other machines: give the key as --key-file gs://")
    # Build the graph as run_deid does (--dry_run only keeps Beam's bucket checks offline).
    options = pipeline_run.pipeline_options([*beam_args, "--dry_run", "True"])
    pipeline = pipeline_run.make_pipeline(options)
    cfg = RunConfig(plan=plan, output_root=output, run_id="run-1", key_id=KEY.key_id, key_uri=args.key_file)
    pipeline_run.build(pipeline, input_uri, cfg, audit, None)
    proto = pipeline.to_runner_api()
    (fn,) = [f for f in _dofns(proto) if isinstance(f, DeidentifyFn)]
    assert (fn._cfg.key, fn._cfg.key_uri, fn._cfg.output_root) == (None, "gs://my-secrets/deid.key", "gs://my-bucket/deid")
    assert fn._cfg.plan == plan
    assert SECRET not in proto.SerializeToString()


REMOTE_ARGS = ["--runner", "DataflowRunner", "--project", "p", "--region", "europe-west1",
               "--temp_location", "gs://deid-temp-bucket/tmp"]


@pytest.mark.parametrize(
    ("command", "where", "refused"),
    [
        (["anonymize"], ("gs://deid-in/a", "{tmp}/out"), "OUTPUT, --audit as gs:// locations"),
        (["modify", "--level", "Instance"], ("gs://deid-in/a", "gs://deid-out/o", "--audit", "{tmp}/audit"),
         "--audit as gs:// location"),
        (["anonymize"], ("gs://deid-in/a", "gs://deid-out/o", "--crosswalk", "file://{tmp}/cw"),
         "--crosswalk as gs:// location"),
        (["split", "--study", "1.2.3"], ("{tmp}/in", "gs://deid-out/o"), "INPUT as gs:// location"),
    ],
)
def test_a_remote_runner_is_refused_local_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str], command: list[str],
                                                     where: tuple[str, ...], refused: str):
    """Dataflow's workers would walk a folder they do not have, write outputs to their own disks
    (lost, though audited as written) and fail the audit's finalisation after all the work:
    refused before anything runs, naming the local locations."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.dcm").write_bytes(b"DICM")
    monkeypatch.setattr(cli, "load_key", lambda _file: (KEY, "gs://deid-keys/deid.key"))  # no network
    # The other-key check reads OUTPUT's last summary (gs://: a network read, two minutes of
    # retries offline): only once the command is accepted.
    monkeypatch.setattr(cli, "other_key_warning", lambda *_: pytest.fail("read the last summary before refusing"))
    body = '{"Series": ["1.2.3.4"]}' if command[0] == "split" else "{}"
    location_args = [w.format(tmp=tmp_path) for w in where]
    argv = [*command, *location_args, "--key-file", "gs://deid-keys/deid.key", "--body", body, *REMOTE_ARGS]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert capsys.readouterr().err == (
        "dicom-deid: --runner DataflowRunner runs on other machines, which cannot reach this machine's files: "
        f"give {refused}\n"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "audit").exists()


class _RemoteJob:
    """What DataflowRunner.run returns, as far as run_and_wait uses it."""

    def __init__(self, cancel_fails: bool) -> None:
        self.cancelled = 0
        self._cancel_fails = cancel_fails

    state = "RUNNING"

    def wait_until_finish(self, duration: int | None = None) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the launcher waits for the job

    def cancel(self) -> None:
        self.cancelled += 1
        if self._cancel_fails:
            raise RuntimeError("the service is unreachable")


@pytest.mark.parametrize("progress", [False, True])
@pytest.mark.parametrize("cancel_fails", [False, True])
def test_ctrl_c_while_waiting_for_a_remote_job_cancels_it(cancel_fails: bool, progress: bool):
    """Left running, the job would go on unwatched (no summary) and a split's pass 2 would lose
    the plan its workers load, which the launcher removes on its way out. So while it shows
    the job's progress."""
    import io

    job = _RemoteJob(cancel_fails)

    class Pipeline:
        runner = object()

        def run(self, test_runner_api: object) -> _RemoteJob:
            return job

    with pytest.raises(KeyboardInterrupt):
        pipeline_run.run_and_wait(Pipeline(), pipeline_run.pipeline_options(list(DATAFLOW_ARGS)),
                                  io.StringIO() if progress else None)
    assert job.cancelled == 1


class _ProgressingJob:
    """A job on other machines as Beam's result object shows it: running for three polls, its
    DoFns' counters (two steps, attempted values ahead of committed ones) growing meanwhile."""

    def __init__(self, final: str = "DONE") -> None:
        self.polls: list[int | None] = []
        self.state = "RUNNING"
        self._final = final

    def wait_until_finish(self, duration: int | None = None) -> str:
        self.polls.append(duration)
        if duration is None or len(self.polls) >= 3:
            self.state = self._final
        return self.state

    def metrics(self) -> Any:
        from apache_beam.metrics.execution import MetricKey, MetricResult
        from apache_beam.metrics.metricbase import MetricName

        n = len(self.polls)
        counters = [MetricResult(MetricKey(step, MetricName("dicom_deid", name)), committed, attempted)
                    for step, name, committed, attempted in [
                        ("Deidentify", "written", 10 * n, 100 * n), ("Deidentify", "failed", 0, n),
                        ("Other", "written", 0, 5), ("Deidentify", "reason_not_dicom", 0, n)]]
        job = self

        class Results:
            def query(self, filter: Any = None) -> dict[str, list[Any]]:
                assert filter.namespaces == {"dicom_deid"}
                return {"counters": counters if job.polls else [], "distributions": [], "gauges": []}

        return Results()


def test_a_job_on_other_machines_shows_progress_from_its_counters():
    """Dataflow's workers cannot write into a local folder: the launcher polls the job's own
    counters (written/failed/skipped, summed over steps, attempted values) while it waits."""
    import io

    from pipelines.run import wait_for

    job, stream = _ProgressingJob(), io.StringIO()
    wait_for(job, stream, interval=0.01)
    assert job.polls == [10, 10, 10]
    lines = [line.rsplit(", ", 1)[0] for line in stream.getvalue().split("\r") if line]
    assert lines == ["106 files: 105 written, 1 failed, 0 skipped", "207 files: 205 written, 2 failed, 0 skipped",
                     "308 files: 305 written, 3 failed, 0 skipped"]
    assert stream.getvalue().endswith(" files/s   \n")
    quiet = _ProgressingJob()
    wait_for(quiet, None)  # --no-progress: one wait, as before
    assert quiet.polls == [None]


def test_remote_progress_is_for_terminals_and_runners_on_other_machines(monkeypatch: pytest.MonkeyPatch):
    from types import SimpleNamespace

    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: True, raising=False)
    assert cli.remote_progress(SimpleNamespace(progress=None), local_runner=False) is cli.sys.stderr
    assert cli.remote_progress(SimpleNamespace(progress=None), local_runner=True) is None
    assert cli.remote_progress(SimpleNamespace(progress=False), local_runner=False) is None
    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: False, raising=False)
    assert cli.remote_progress(SimpleNamespace(progress=None), local_runner=False) is None
    assert cli.remote_progress(SimpleNamespace(progress=True), local_runner=False) is cli.sys.stderr
