"""transforms.workers.LocalPool: forked workers for local runs, and what happens when one dies.

The pool forks *this* process, so a test changes what a worker does by patching
``transforms.files.process_file`` before the pool starts (the workers inherit the patch).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pydicom
import pytest

from pipelines import cli
from tests.pipeline_support import KEY, SECRET, default_signals, output_files, read_rows, write_key
from tests.synthetic import make_study, write_study
from transforms import files, request, workers
from transforms.files import RunConfig

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool forks (Linux only)")

ANONYMIZE = request.parse_anonymize({})
REPO = Path(__file__).resolve().parents[1]


def _cfg(output: Path, run_id: str = "test-run") -> RunConfig:
    return RunConfig(plan=ANONYMIZE, output_root=str(output), run_id=run_id, key_id=KEY.key_id, key=KEY)


def _inputs(folder: Path, n_ct: int = 5) -> list[tuple[str, int]]:
    paths = write_study(make_study(seed=7, n_ct=n_ct), folder)
    (folder / "junk.txt").write_bytes(b"not DICOM")
    listed = [*paths, folder / "junk.txt"]
    return [(str(p), p.stat().st_size) for p in listed]


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    """Poll ``condition`` until true: the interleaving a test needs has happened (no guessed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _take_all(pool: workers.LocalPool, owner: object) -> dict[str, object]:
    results = {path: result for path, _, result in pool.take(owner, all_of_them=True)}
    assert pool.take(owner, all_of_them=True) == []
    return results


_TIME_COLUMNS = ("started_at", "finished_at", "output_uri", "source_uri")


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in _TIME_COLUMNS}


def test_pool_rows_and_files_equal_the_inline_ones(tmp_path: Path):
    inputs = _inputs(tmp_path / "in")
    inline = {path: files.process_file(path, size, _cfg(tmp_path / "inline"), KEY) for path, size in inputs}
    pool = workers.LocalPool(_cfg(tmp_path / "pooled"), KEY, processes=2, depth=2)
    try:
        assert workers.pool_for("test-run") is pool
        for path, size in inputs:
            assert pool.submit("me", path, size)
        results = _take_all(pool, "me")
    finally:
        pool.close()
    assert workers.pool_for("test-run") is None
    assert sorted(results) == sorted(inline)
    for path, (audit, crosswalk, matched) in results.items():
        assert _comparable(audit) == _comparable(inline[path][0])
        assert (crosswalk, matched) == (None, [])
    statuses = sorted(audit["status"] for audit, _, _ in results.values())
    assert statuses == ["failed"] + ["written"] * 7  # 5 CT + RTSTRUCT + SR, and the text file
    assert output_files(tmp_path / "pooled") == output_files(tmp_path / "inline")
    # the workers are gone
    assert not pool.alive


def test_owners_get_only_their_own_files(tmp_path: Path):
    inputs = _inputs(tmp_path / "in", n_ct=2)
    with workers.LocalPool(_cfg(tmp_path / "out"), KEY, processes=2, depth=1) as pool:
        for i, (path, size) in enumerate(inputs):
            pool.submit(i % 2, path, size)
        odd, even = _take_all(pool, 1), _take_all(pool, 0)
    assert sorted(even) == [p for i, (p, _) in enumerate(inputs) if i % 2 == 0]
    assert sorted(odd) == [p for i, (p, _) in enumerate(inputs) if i % 2 == 1]


def _crash_on(name: str):
    real = files.process_file

    def process_file(path, size, cfg, key, **kwargs):
        if Path(path).name == name or name == "*":
            os._exit(3)  # as a native crash or an out-of-memory kill would
        return real(path, size, cfg, key, **kwargs)

    return process_file


def test_a_dead_worker_fails_only_the_file_it_had_in_hand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    inputs = _inputs(tmp_path / "in")
    crash = Path(inputs[1][0]).name
    monkeypatch.setattr(files, "process_file", _crash_on(crash))
    with workers.LocalPool(_cfg(tmp_path / "out"), KEY, processes=2, depth=3) as pool:
        for path, size in inputs:
            assert pool.submit("me", path, size)
        results = _take_all(pool, "me")
        assert pool.alive  # one worker is left
    assert sorted(results) == sorted(p for p, _ in inputs)  # every file answered, once
    lost = [p for p, r in results.items() if isinstance(r, workers.WorkerLost)]
    assert [Path(p).name for p in lost] == [crash]
    others = [r[0]["status"] for p, r in results.items() if p not in lost]
    assert sorted(others) == ["failed"] + ["written"] * 6  # the text file fails as not_dicom
    # the row the DoFn makes of it
    row = files.failed_row(lost[0], 123, _cfg(tmp_path / "out"), results[lost[0]], "process")
    assert (row["status"], row["reason"], row["bytes_in"], row["output_uri"]) == ("failed", "internal_error", 123, None)
    assert row["detail"] == "process: the worker process ended with status 3 while processing this file"


@pytest.mark.parametrize(("exitcode", "detail"), [
    (-9, "was killed by signal 9 (SIGKILL: the out-of-memory killer or kill -9)"),
    (-11, "was killed by signal 11 (SIGSEGV: a native crash)"),
    (-10, "was killed by signal 10 (a signal)"),
    (None, "ended (native crash, out-of-memory kill or signal)"),
])
def test_a_lost_worker_says_how_it_ended(exitcode, detail):
    assert str(workers.WorkerLost(exitcode)) == f"the worker process {detail} while processing this file"


def _hang_on(name: str):
    real = files.process_file

    def process_file(path, size, cfg, key, **kwargs):
        if Path(path).name == name:
            while True:  # as a codec caught in a loop (no signal, no answer)
                time.sleep(0.05)
        return real(path, size, cfg, key, **kwargs)

    return process_file


def test_a_file_past_the_deadline_fails_with_timeout_and_the_rest_goes_on(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """A file that never finishes used to hold the run forever (and the files queued behind it
    on that worker): past ``file_timeout`` its worker is killed, the file fails with reason
    ``timeout`` and the queued files move to the other worker."""
    inputs = _inputs(tmp_path / "in")
    stuck = Path(inputs[1][0]).name
    monkeypatch.setattr(files, "process_file", _hang_on(stuck))
    started = time.monotonic()
    with workers.LocalPool(_cfg(tmp_path / "out"), KEY, processes=2, depth=3, file_timeout=1.0) as pool:
        pids = [w.process.pid for w in pool._workers]
        for path, size in inputs:
            assert pool.submit("me", path, size)
        results = _take_all(pool, "me")
        assert (len(pool._workers), pool.replaced) == (2, 1)  # the stuck one replaced
        pids += [w.process.pid for w in pool._workers]
    assert time.monotonic() - started < 60
    assert sorted(results) == sorted(p for p, _ in inputs)
    timed_out = [p for p, r in results.items() if isinstance(r, workers.FileTimedOut)]
    assert [Path(p).name for p in timed_out] == [stuck]
    assert sorted(r[0]["status"] for p, r in results.items() if p not in timed_out) == ["failed"] + ["written"] * 6
    row = files.failed_row(timed_out[0], 123, _cfg(tmp_path / "out"), results[timed_out[0]], "process")
    assert (row["status"], row["reason"], row["detail"]) == (
        "failed", "timeout", "process: processing took more than 1 s (--file-timeout): the worker process was stopped")
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]  # the stuck one killed, the others stopped


def test_a_lost_worker_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Every forked worker dies on its first file; each is replaced by a fresh interpreter
    (``python -m transforms.workers``: the patch that crashed the forks is not in it), which processes
    the rest. Before, the files went back to Beam's process once both were gone, where the
    next native crash ended the run."""
    inputs = _inputs(tmp_path / "in")
    monkeypatch.setattr(files, "process_file", _crash_on("*"))
    # A folder of the user's with a package of the same name is not imported in its place.
    (tmp_path / "cwd" / "transforms").mkdir(parents=True)
    (tmp_path / "cwd" / "transforms" / "__init__.py").write_text("raise SystemExit(5)\n")
    monkeypatch.chdir(tmp_path / "cwd")
    with workers.LocalPool(_cfg(tmp_path / "out"), KEY, processes=2, depth=2) as pool:
        forked = [w.process.pid for w in pool._workers]
        for path, size in inputs:
            assert pool.submit("me", path, size)
        results = _take_all(pool, "me")
        assert pool.replaced == 2 and len(pool._workers) == 2
        assert not {w.process.pid for w in pool._workers} & set(forked)
    assert sorted(results) == sorted(p for p, _ in inputs)
    lost = [p for p, r in results.items() if isinstance(r, workers.WorkerLost)]
    assert len(lost) == 2 and all(str(results[p]).startswith("the worker process ended with status 3") for p in lost)
    assert None not in results.values()
    statuses = sorted(r[0]["status"] for p, r in results.items() if p not in lost)
    assert statuses in (["failed"] + ["written"] * 5, ["written"] * 6)  # (the text file may be one of the lost)


@pytest.mark.parametrize("no_replacement", ["replace=False", "/bin/false", "/nonexistent/python"])
def test_without_workers_the_files_come_back_to_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           no_replacement: str):
    """Without replacements (turned off, or one that ends before it is ready, or cannot be
    started at all: no file is given to it) the files come back to the caller."""
    inputs = _inputs(tmp_path / "in")
    monkeypatch.setattr(files, "process_file", _crash_on("*"))
    if no_replacement != "replace=False":
        monkeypatch.setattr(sys, "executable", no_replacement)
    with workers.LocalPool(_cfg(tmp_path / "out"), KEY, processes=2, depth=2,
                           replace=no_replacement != "replace=False") as pool:
        # A worker may die before the last submit: then that file is refused (False) at once.
        refused = [path for path, size in inputs[:4] if not pool.submit("me", path, size)]
        results = _take_all(pool, "me")
        assert not pool.alive
        assert pool.submit("me", *inputs[4]) is False  # nobody left: the caller processes it
    # each worker died with one file in hand; the files queued behind them come back as None
    assert sorted([*results, *refused]) == sorted(p for p, _ in inputs[:4])
    assert sum(isinstance(r, workers.WorkerLost) for r in results.values()) == 2
    assert sum(r is None for r in results.values()) + len(refused) == 2
    assert pool.replaced == 0


def test_an_unexpected_error_in_a_worker_fails_the_run_without_its_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def process_file(path, size, cfg, key, **kwargs):
        raise ValueError("PATIENT^NAME in an exception message")

    monkeypatch.setattr(files, "process_file", process_file)
    inputs = _inputs(tmp_path / "in", n_ct=1)
    monkeypatch.delenv("DICOM_DEID_DEBUG", raising=False)
    with workers.LocalPool(_cfg(tmp_path / "out"), KEY, processes=1) as pool:
        pool.submit("me", *inputs[0])
        with pytest.raises(RuntimeError) as caught:
            pool.take("me", all_of_them=True)
    assert str(caught.value) == "in a worker process: ValueError"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _still_running(pids: list[int], wait: float = 10.0) -> list[int]:
    """The processes among ``pids`` still running after up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if _running(pid)]


def test_workers_end_when_the_command_is_killed(tmp_path: Path):
    """SIGKILL leaves no cleanup to the parent: the workers see their pipe close and exit."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.test_workers import _cfg
        from tests.pipeline_support import KEY
        from transforms.workers import LocalPool
        from pathlib import Path
        pool = LocalPool(_cfg(Path({str(tmp_path)!r})), KEY, processes=2)
        print(" ".join(str(w.process.pid) for w in pool._workers), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2

    assert not _still_running(pids)


def test_a_worker_stuck_in_a_file_ends_with_the_command(tmp_path: Path):
    """A worker notices the parent's end between files; one stuck inside a file used to run on
    as an orphan until killed by hand: the kernel kills it with its parent (PR_SET_PDEATHSIG)."""
    inputs = _inputs(tmp_path / "in")
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from tests.test_workers import _cfg
        from tests.pipeline_support import KEY
        from transforms import files
        from transforms.workers import LocalPool
        from pathlib import Path
        def stuck(*args, **kwargs):
            Path({str(tmp_path / "began")!r}).touch()
            while True:
                time.sleep(0.05)
        files.process_file = stuck
        pool = LocalPool(_cfg(Path({str(tmp_path)!r})), KEY, processes=2)
        print(" ".join(str(w.process.pid) for w in pool._workers), flush=True)
        pool.submit("me", {inputs[0][0]!r}, {inputs[0][1]})
        while not os.path.exists({str(tmp_path / "began")!r}):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2 and (tmp_path / "began").exists()

    alive = _still_running(pids)
    for pid in alive:  # (a failure must not leave the stuck worker behind)
        os.kill(pid, signal.SIGKILL)
    assert not alive


def test_default_processes_is_the_usable_cpus(monkeypatch: pytest.MonkeyPatch):
    cpus = len(os.sched_getaffinity(0))
    quota = workers.cgroup_cpu_quota()
    usable = cpus if quota is None else min(cpus, max(1, -(-quota // 1)))
    assert workers.default_processes() == (usable if usable > 1 else 0)
    # a container allowed 1.5 CPUs on a bigger machine: two workers; 0.5 CPU: none
    monkeypatch.setattr(workers, "cgroup_cpu_quota", lambda: 1.5)
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert workers.default_processes() == 2
    monkeypatch.setattr(workers, "cgroup_cpu_quota", lambda: 0.5)
    assert workers.default_processes() == 0
    monkeypatch.setattr(workers, "cgroup_cpu_quota", lambda: None)
    assert workers.default_processes() == 64


@pytest.mark.parametrize(
    ("files_", "quota"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_quota(tmp_path: Path, files_: dict[str, str], quota: float | None):
    for name, text in files_.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert workers.cgroup_cpu_quota(str(tmp_path)) == quota


# --------------------------------------------------------------------------- through the command


def _run(tmp_path: Path, input_: Path, *extra: str, out: str = "out") -> tuple[int, Path, Path]:
    key = write_key(tmp_path)
    output = tmp_path / out
    code = cli.main(["anonymize", str(input_), str(output), "--key-file", str(key), "--quiet", *extra])
    return code, output, Path(str(output) + "-audit")


def test_a_worker_crash_is_one_failed_row_and_the_run_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "in"
    inputs = _inputs(folder)
    crash = Path(inputs[2][0]).name
    monkeypatch.setattr(files, "process_file", _crash_on(crash))
    code, output, audit = _run(tmp_path, folder, "--processes", "2")
    assert code == cli.EXIT_SOME_FAILED
    rows = read_rows(audit)
    assert sorted(r["source_uri"] for r in rows) == sorted(p for p, _ in inputs)  # one row each
    by_name = {Path(r["source_uri"]).name: r for r in rows}
    assert (by_name[crash]["status"], by_name[crash]["reason"]) == ("failed", "internal_error")
    assert "worker process ended" in by_name[crash]["detail"]
    assert (by_name["junk.txt"]["status"], by_name["junk.txt"]["reason"]) == ("failed", "not_dicom")
    assert sum(r["status"] == "written" for r in rows) == 6
    assert len(output_files(output)) == 6


def test_a_resources_entry_whose_file_crashed_its_worker_was_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``ResourcesNotFound`` lists the entries that matched no input: an entry whose only file
    ended its worker was listed too (its matches died with the worker); the file's header is
    read again to say it was there."""
    folder = tmp_path / "in"
    inputs = _inputs(folder)
    crash, other = Path(inputs[2][0]), Path(inputs[3][0])
    uid = {p: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (crash, other)}
    monkeypatch.setattr(files, "process_file", _crash_on(crash.name))
    body = json.dumps({"Resources": ["1.2.3.999", uid[crash], uid[other]]})
    code, output, audit = _run(tmp_path, folder, "--processes", "2", "--body", body)
    assert code == cli.EXIT_SOME_FAILED
    statuses = {Path(r["source_uri"]).name: (r["status"], r["reason"]) for r in read_rows(audit)}
    assert statuses[crash.name] == ("failed", "internal_error") and statuses[other.name] == ("written", None)
    assert json.loads((audit / "summary.json").read_text())["ResourcesNotFound"] == [0]


def test_pool_and_no_pool_write_the_same_files_and_rows(tmp_path: Path):
    folder = tmp_path / "in"
    _inputs(folder, n_ct=6)
    code0, out0, audit0 = _run(tmp_path, folder, "--processes", "0", out="zero")
    code3, out3, audit3 = _run(tmp_path, folder, "--processes", "3", out="three")
    assert (code0, code3) == (cli.EXIT_SOME_FAILED, cli.EXIT_SOME_FAILED)
    assert output_files(out0) == output_files(out3)
    drop = ("started_at", "finished_at", "output_uri", "run_id")
    rows0 = [{k: v for k, v in r.items() if k not in drop} for r in read_rows(audit0)]
    rows3 = [{k: v for k, v in r.items() if k not in drop} for r in read_rows(audit3)]
    assert rows0 == rows3
    assert SECRET not in b"".join(p.read_bytes() for p in audit3.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--processes", "-1"], "--processes: must be 0 or more"),
        (["--processes", "two"], "--processes: must be a whole number"),
        (["--file-timeout", "0"], "--file-timeout: must be more than 0 seconds"),
        (["--file-timeout", "nan"], "--file-timeout: must be more than 0 seconds"),
        (["--file-timeout", "soon"], "--file-timeout: must be a number of seconds"),
        (["--processes", "0", "--file-timeout", "60"], "--file-timeout: the deadline is kept by the worker processes"),
        (
            ["--processes", "2", "--direct_running_mode", "multi_processing"],
            "--processes: not with --direct_running_mode multi_processing (Beam's own processes)",
        ),
    ],
)
def test_processes_option_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str):
    folder = tmp_path / "in"
    _inputs(folder, n_ct=1)
    code, output, _ = _run(tmp_path, folder, *extra)
    assert code == cli.EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not output.exists()


def _command(tmp_path: Path, folder: Path, patch: str, *extra: str, out: str = "out") -> list[str]:
    """argv running the command in a fresh interpreter, after ``patch`` (Python source run
    first, with ``cli``, ``files``, ``workers``, ``real = files.process_file`` and ``time`` at hand)."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from pipelines import cli
        from transforms import files, workers
        real = files.process_file
        """
    ) + textwrap.dedent(patch) + "sys.exit(cli.main(sys.argv[1:]))\n"
    return [sys.executable, "-c", script, "anonymize", str(folder), str(tmp_path / out),
            "--key-file", str(write_key(tmp_path)), "--processes", "2", "--quiet", *extra]


def test_the_command_fails_a_file_past_its_deadline_and_finishes(tmp_path: Path):
    """End to end: one file never finishes; with --file-timeout 2 the run ends, the file has
    its failed / timeout row, every other file its usual row, the summary counts it."""
    folder = tmp_path / "in"
    inputs = _inputs(folder)
    stuck = Path(inputs[2][0]).name
    patch = f"""
    def hang(path, *args, **kwargs):
        while path.endswith({stuck!r}):
            time.sleep(0.05)
        return real(path, *args, **kwargs)
    files.process_file = hang
    """
    done = subprocess.run(_command(tmp_path, folder, patch, "--file-timeout", "2"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == cli.EXIT_SOME_FAILED, done.stderr
    assert done.stderr == "dicom-deid: 2 of 8 input files failed (not_dicom 1, timeout 1); see " \
        f"{tmp_path / 'out-audit'}\n"
    rows = {Path(r["source_uri"]).name: (r["status"], r["reason"]) for r in read_rows(tmp_path / "out-audit")}
    assert rows[stuck] == ("failed", "timeout")
    assert sorted(v for k, v in rows.items() if k != stuck) == [("failed", "not_dicom")] + [("written", None)] * 6
    summary = json.loads((tmp_path / "out-audit" / "summary.json").read_text())
    assert summary["Reasons"] == {"not_dicom": 1, "timeout": 1}


def test_more_crashing_files_than_workers_end_as_rows_not_as_a_crash(tmp_path: Path):
    """Three files that crash native code (SIGSEGV), two workers: the third crash used to hit
    Beam's own process (both workers gone) and end the run with no audit. Lost workers are
    replaced, so each crash costs its file only. The crash is planted through a
    ``sitecustomize`` module so that every process of the run has it, fork server included."""
    folder = tmp_path / "in"
    inputs = _inputs(folder, n_ct=8)
    crashing = sorted(Path(p).name for p, _ in inputs if p.endswith(".dcm"))[1:4]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from transforms import files
        real = files.process_file
        def crash(path, *args, **kwargs):
            if os.path.basename(path) in {crashing!r}:
                os.kill(os.getpid(), signal.SIGSEGV)
            return real(path, *args, **kwargs)
        files.process_file = crash
    """))
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(_command(tmp_path, folder, ""), capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == cli.EXIT_SOME_FAILED, done.stderr
    rows = {Path(r["source_uri"]).name: r for r in read_rows(tmp_path / "out-audit")}
    assert sorted(rows) == sorted(Path(p).name for p, _ in inputs)
    for name in crashing:
        assert (rows[name]["status"], rows[name]["reason"], rows[name]["detail"]) == (
            "failed", "internal_error",
            "process: the worker process was killed by signal 11 (SIGSEGV: a native crash) while processing this file")
    others = sorted((r["status"], r["reason"]) for name, r in rows.items() if name not in crashing)
    assert others == [("failed", "not_dicom")] + [("written", None)] * (len(inputs) - 4)


_SLOW_FILES = """
def slow(*args, **kwargs):
    time.sleep(0.2)
    return real(*args, **kwargs)
files.process_file = slow
"""


def _interrupt(child: subprocess.Popen, out: Path, signum: int = signal.SIGINT) -> None:
    """Ctrl-C (or a hangup) to the command's process group: "interrupted" (130), no traceback,
    no temporary files left, and whatever was published is whole."""
    os.killpg(child.pid, signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == cli.EXIT_INTERRUPTED, err
    assert err.strip().splitlines()[-1] == "dicom-deid: interrupted"
    assert "Traceback" not in err
    assert not (out / files.TMP_DIR_NAME).exists()
    for path in out.rglob("*.dcm"):
        assert pydicom.dcmread(path).PatientIdentityRemoved == "YES"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_ctrl_c_stops_the_workers_after_their_file(tmp_path: Path, signum: int):
    """SIGINT to the whole process group (a terminal's Ctrl-C), or SIGHUP (the terminal or SSH
    session closed): the workers ignore it and finish the file in hand, the command says
    "interrupted" (130), stops them and leaves no temporary files; every published output is
    complete."""
    folder = tmp_path / "in"
    _inputs(folder, n_ct=12)
    started = tmp_path / "started"
    started.mkdir()
    mark = f"""
    import os
    slow_file = files.process_file
    def mark(path, *args, **kwargs):
        open(os.path.join({str(started)!r}, os.path.basename(path)), "w").close()
        return slow_file(path, *args, **kwargs)
    files.process_file = mark
    """
    child, pids = _start_announcing_workers(tmp_path, folder, _SLOW_FILES + textwrap.dedent(mark))
    _wait_for(lambda: len(list(started.iterdir())) >= 2, "two files begun")  # of 12, 0.2 s each
    _interrupt(child, tmp_path / "out", signum)
    assert _still_running(pids) == []


_ANNOUNCE_WORKERS = """
start = workers.LocalPool.__init__
def announce(self, *args, **kwargs):
    start(self, *args, **kwargs)
    print(" ".join(str(w.process.pid) for w in self._workers), flush=True)
workers.LocalPool.__init__ = announce
"""


def _start_announcing_workers(tmp_path: Path, folder: Path, patch: str) -> tuple[subprocess.Popen, list[int]]:
    """The command (:func:`_command`, after ``patch``) started in a session of its own, and the
    PIDs of its two workers, which it prints first."""
    argv = _command(tmp_path, folder, textwrap.dedent(patch) + _ANNOUNCE_WORKERS)
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=default_signals)
    pids = [int(p) for p in child.stdout.readline().split()]
    assert len(pids) == 2
    return child, pids


def test_ctrl_c_does_not_wait_a_minute_for_a_file_that_never_ends(tmp_path: Path):
    """A worker busy with a long file (a huge transcode, a stuck read) used to hold an
    interrupted run for the full minute a finishing run gives its workers, in silence: a
    stopped run writes no more rows, so its workers get STOPPED_RUN_GRACE seconds, then are
    killed, and nothing half-written is left."""
    folder = tmp_path / "in"
    _inputs(folder, n_ct=4)
    started = tmp_path / "started"
    started.mkdir()
    patch = f"""
    import os
    def endless(path, *args, **kwargs):
        open(os.path.join({str(started)!r}, os.path.basename(path)), "w").close()
        while True:
            time.sleep(0.05)
    files.process_file = endless
    """
    child, pids = _start_announcing_workers(tmp_path, folder, patch)
    _wait_for(lambda: len(list(started.iterdir())) >= 2, "both workers busy")
    began = time.monotonic()
    _interrupt(child, tmp_path / "out")
    waited = time.monotonic() - began
    assert waited < workers._CLOSE_TIMEOUT / 2, waited  # ~STOPPED_RUN_GRACE; it used to be a minute
    assert not list((tmp_path / "out").rglob("*.dcm"))
    assert _still_running(pids) == []


def test_workers_make_their_own_storage_clients(tmp_path: Path):
    """A client the command made before the fork (reading a gs:// key file) holds connections
    the parent goes on using: a worker must not share them."""
    files._GCS_CLIENTS.client = parent_client = object()
    try:
        script_result = tmp_path / "seen.txt"

        def process_file(path, size, cfg, key, **kwargs):
            script_result.write_text(repr(getattr(files._GCS_CLIENTS, "client", None)))
            raise ValueError("stop")

        real = files.process_file
        files.process_file = process_file
        try:
            with workers.LocalPool(_cfg(tmp_path / "out"), KEY, processes=1) as pool:
                pool.submit("me", "x.dcm", 1)
                with pytest.raises(RuntimeError):
                    pool.take("me", all_of_them=True)
        finally:
            files.process_file = real
        assert script_result.read_text() == "None"
        assert files._GCS_CLIENTS.client is parent_client  # the parent's own stays
    finally:
        del files._GCS_CLIENTS.client


def test_a_pool_that_cannot_start_falls_back_to_beams_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]):
    def no_fork(*args, **kwargs):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr("multiprocessing.process.BaseProcess.start", no_fork)
    folder = tmp_path / "in"
    inputs = _inputs(folder, n_ct=2)
    code, output, audit = _run(tmp_path, folder, "--processes", "2")
    assert code == cli.EXIT_SOME_FAILED  # the text file
    err = capsys.readouterr().err
    assert "warning: cannot start 2 worker processes (BlockingIOError): the files are processed in Beam's own process" in err
    rows = read_rows(audit)
    assert sorted(r["source_uri"] for r in rows) == sorted(p for p, _ in inputs)
    assert sum(r["status"] == "written" for r in rows) == 4
    assert workers.pool_for(rows[0]["run_id"]) is None


# --------------------------------------------------------------------------- head start


def test_head_start_files_are_claimed_in_any_order_and_equal_the_inline_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Some answers are ready before their claim (all but each worker's last file), the last two
    only after it: a gate file holds them until every claim is in."""
    inputs = _inputs(tmp_path / "in")  # 8 files: worker 0 gets 0, 2, 4, 6; worker 1 gets 1, 3, 5, 7
    inline = {path: files.process_file(path, size, _cfg(tmp_path / "inline"), KEY) for path, size in inputs}
    late = {path for path, _ in inputs[-2:]}
    gate, done = tmp_path / "gate", tmp_path / "done"
    done.mkdir()
    real = files.process_file

    def gated(path, size, cfg, key, **kwargs):  # runs in the forked workers
        deadline = time.monotonic() + 120
        while path in late and not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        result = real(path, size, cfg, key, **kwargs)
        (done / Path(path).name).touch()
        return result

    monkeypatch.setattr(files, "process_file", gated)
    with workers.LocalPool(_cfg(tmp_path / "pooled"), KEY, processes=2, head_start=inputs) as pool:
        _wait_for(lambda: len(list(done.iterdir())) == len(inputs) - 2, "the early answers")
        for path, size in reversed(inputs):
            assert pool.submit("me", path, size)
        assert len(list(done.iterdir())) == len(inputs) - 2  # the late ones wait for their claim
        gate.touch()
        results = _take_all(pool, "me")
        assert pool.close() == []  # everything was claimed
    assert sorted(results) == sorted(inline)
    for path, (audit, _, _) in results.items():
        assert _comparable(audit) == _comparable(inline[path][0])
    assert output_files(tmp_path / "pooled") == output_files(tmp_path / "inline")


def test_a_file_that_is_not_in_the_head_start_is_sent_as_usual(tmp_path: Path):
    inputs = _inputs(tmp_path / "in", n_ct=3)
    with workers.LocalPool(_cfg(tmp_path / "out"), KEY, processes=2, depth=1, head_start=inputs[:4]) as pool:
        for path, size in inputs:  # 4 claims, then files sent behind the head start
            assert pool.submit("me", path, size)
        results = _take_all(pool, "me")
    assert sorted(results) == sorted(p for p, _ in inputs)
    assert sorted(r[0]["status"] for r in results.values()) == ["failed"] + ["written"] * 5


def test_two_head_start_files_under_one_path_are_two_jobs(tmp_path: Path):
    """A Latin-1 name is listed under its printable form with the size UNREADABLE_NAME; a real
    file may spell out the same form. Jobs and answers are keyed by path and, for that marker
    only, size: each claim gets its own file's answer, in either order of the listing and of
    the claims."""
    path, size = _inputs(tmp_path / "in", n_ct=1)[0]
    for listed in ([(path, files.UNREADABLE_NAME), (path, size)], [(path, size), (path, files.UNREADABLE_NAME)]):
        for claims in (listed, listed[::-1]):
            with workers.LocalPool(_cfg(tmp_path / "out"), KEY, processes=2, head_start=listed) as pool:
                for claim in claims:
                    assert pool.submit("me", *claim)
                got = sorted((s, r[0]["status"], r[0]["reason"]) for _, s, r in pool.take("me", all_of_them=True))
                assert pool.close() == []
            assert got == [(files.UNREADABLE_NAME, "failed", "read_error"), (size, "written", None)]


def test_a_head_start_file_that_grew_before_its_claim_is_claimed_once(tmp_path: Path):
    """A file still being copied in is listed by the head start with one size and by the
    pipeline with another: one file, claimed once (one row), not an unclaimed orphan besides."""
    path, size = _inputs(tmp_path / "in", n_ct=1)[0]
    with workers.LocalPool(_cfg(tmp_path / "out"), KEY, processes=1, head_start=[(path, size)]) as pool:
        assert pool.submit("me", path, size + 100)
        got = pool.take("me", all_of_them=True)
        assert pool.close() == []
    assert [(p, s, r[0]["status"]) for p, s, r in got] == [(path, size, "written")]


def test_close_returns_the_head_start_files_nobody_claimed(tmp_path: Path):
    """The folder changed between the command's listing and the pipeline's: what the workers
    processed anyway comes back from close() for the audit; what they had not begun is not done."""
    inputs = _inputs(tmp_path / "in")  # 8 files: worker 0 gets 0, 2, 4, 6; worker 1 gets 1, 3, 5, 7
    pool = workers.LocalPool(_cfg(tmp_path / "out"), KEY, processes=2, head_start=inputs)
    try:
        for path, size in inputs[5:7]:  # each worker's next-to-last: all before it are done then
            assert pool.submit("me", path, size)
        claimed = _take_all(pool, "me")
    finally:
        unclaimed = pool.close()
    assert sorted(claimed) == sorted(p for p, _ in inputs[5:7])
    returned = {path: result for path, _, result in unclaimed}
    assert set(p for p, _ in inputs[:5]) <= set(returned) <= set(p for p, _ in inputs) - set(claimed)
    written = {r[0]["output_uri"] for r in [*claimed.values(), *returned.values()] if r[0]["status"] == "written"}
    on_disk = {str(tmp_path / "out" / name) for name in output_files(tmp_path / "out")}
    assert written == on_disk  # every output has its row
    assert pool.close() == []


def test_a_worker_that_dies_in_its_head_start_fails_only_that_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    inputs = _inputs(tmp_path / "in")
    crash = Path(inputs[2][0]).name  # worker 0's second file: its later ones go to worker 1
    crashed = tmp_path / "crashed"
    crash_on = _crash_on(crash)

    def marked(path, *args, **kwargs):
        if Path(path).name == crash:
            crashed.touch()
        return crash_on(path, *args, **kwargs)

    monkeypatch.setattr(files, "process_file", marked)
    with workers.LocalPool(_cfg(tmp_path / "out"), KEY, processes=2, head_start=inputs) as pool:
        _wait_for(crashed.exists, "the crash")  # before anything is claimed
        for path, size in inputs:
            assert pool.submit("me", path, size)
        results = _take_all(pool, "me")
        assert pool.alive
    assert sorted(results) == sorted(p for p, _ in inputs)
    lost = [Path(p).name for p, r in results.items() if isinstance(r, workers.WorkerLost)]
    assert lost == [crash]
    assert sorted(r[0]["status"] for p, r in results.items() if Path(p).name != crash) == ["failed"] + ["written"] * 6


def test_the_run_audits_a_head_start_file_the_pipeline_did_not_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "in"
    inputs = _inputs(folder, n_ct=2)
    gone = _inputs(tmp_path / "elsewhere", n_ct=1)[0]  # as if moved away after the first listing
    real = cli._head_start
    monkeypatch.setattr(cli, "_head_start", lambda uri, n: [*real(uri, n), gone])
    code, output, audit = _run(tmp_path, folder, "--processes", "2", "--crosswalk", str(tmp_path / "cw"))
    assert code == cli.EXIT_SOME_FAILED  # the text file
    rows = read_rows(audit)
    assert sorted(r["source_uri"] for r in rows) == sorted([*(p for p, _ in inputs), gone[0]])
    extra = next(r for r in rows if r["source_uri"] == gone[0])
    assert extra["status"] == "written" and Path(extra["output_uri"]).is_file()
    assert sorted(p.name for p in audit.glob("*.parquet")) == sorted(
        [f"audit-{extra['run_id']}-00000-of-00001.parquet", f"audit-{extra['run_id']}-unclaimed.parquet"]
    )
    summary = json.loads((audit / "summary.json").read_text())
    assert summary["InputFiles"] == len(inputs) + 1
    assert summary["Statuses"] == {"written": len(inputs), "failed": 1, "skipped": 0}  # the text file failed
    crosswalk = read_rows(tmp_path / "cw")
    assert len(crosswalk) == len(inputs)  # one per written file


def test_default_local_runs_fork_the_workers_before_importing_beam(tmp_path: Path):
    """No Beam option (or only the README's ``--runner DirectRunner``), a local folder: the
    workers start on the first files while the command imports Beam; with another Beam option
    the command needs Beam first (and forks after)."""
    folder = tmp_path / "in"
    _inputs(folder, n_ct=2)
    record = f"""
    def record(*args, **kwargs):
        with open({str(tmp_path / "seen.txt")!r}, "a") as f:
            f.write(str("apache_beam" in sys.modules) + "\\n")
        return real(*args, **kwargs)
    files.process_file = record
    """
    runs = (("early", []), ("named", ["--runner", "DirectRunner"]), ("late", ["--direct_num_workers", "1"]))
    for out, extra in runs:
        (tmp_path / "seen.txt").unlink(missing_ok=True)
        done = subprocess.run(_command(tmp_path, folder, record, *extra, out=out), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == cli.EXIT_SOME_FAILED, done.stderr  # the text file
        seen = (tmp_path / "seen.txt").read_text().split()
        assert seen == (["True"] * 5 if out == "late" else ["False"] * 5)


def test_ctrl_c_before_the_pipeline_runs_leaves_no_temporaries(tmp_path: Path):
    """The head start's workers publish files while the command is still importing Beam; an
    interrupt then (here: while Beam's options are read) stops them and removes the run's
    temporary folder as the pipeline's own clean-up would."""
    folder = tmp_path / "in"
    _inputs(folder, n_ct=12)
    stuck = """
    from pipelines import run
    def stuck(*args, **kwargs):
        print("ready", flush=True)
        time.sleep(60)
    run.pipeline_options = stuck
    """
    argv = _command(tmp_path, folder, _SLOW_FILES + textwrap.dedent(stuck))
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=default_signals)
    assert child.stdout.readline().strip() == "ready"
    out = tmp_path / "out"  # the workers are on their head start: one output is published
    _wait_for(lambda: any(files.TMP_DIR_NAME not in p.parts for p in out.rglob("*.dcm")), "a published file")
    _interrupt(child, tmp_path / "out")
    assert list((tmp_path / "out").rglob("*.dcm"))  # some were published before the interrupt


def test_a_stop_signal_while_the_pool_forks_arrives_after_the_forks(tmp_path: Path, monkeypatch):
    """Found by a review: Ctrl-C or SIGTERM reaching the command's handler inside an at-fork
    hook was dropped (CPython ignores exceptions raised there) and the run went on to exit 0.
    The pool notes the stop signals while it forks: one sent during the forks (whichever
    thread takes it) is raised once every worker is started, the pool closes them, and the
    handler is the command's again."""
    started: list[object] = []
    real_worker = workers._Worker

    def worker(process, conn, replacement=False):
        started.append(process)
        if len(started) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # pending until the forks are done
        return real_worker(process, conn, replacement)

    monkeypatch.setattr(workers, "_Worker", worker)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            workers.LocalPool(_cfg(tmp_path / "out"), KEY, processes=3, depth=1)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(started) == 3
    _wait_for(lambda: not any(p.is_alive() for p in started), "the workers to end")
