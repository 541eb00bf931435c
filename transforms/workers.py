"""Worker processes for local runs: the per-file work on every CPU of this machine.

Beam's DirectRunner runs a pipeline's DoFns in one process by default (``in_memory``), on one
CPU: the de-identification core is CPU-bound Python and holds the GIL. Its
``multi_processing`` mode starts a fresh interpreter per worker, which imports Beam and our
modules again (~2 s before the first file) and splits the input statically. For local runs
the command instead forks N processes *before* the pipeline starts (:class:`LocalPool`): the
parent has imported the core and holds the run's configuration and key, so the children have
them without anything being serialised, and they are ready in milliseconds.

``DeidentifyFn`` finds the pool of its run in its own process (:func:`pool_for`) and hands it
``(path, size)`` pairs: a worker runs :func:`transforms.files.process_file` (read, de-identify,
encode, hash, publish: the file never crosses a process boundary) and sends back the audit
row, the crosswalk row and the matched ``Resources`` positions. On Dataflow, in
``multi_processing`` and in the one-file command there is no pool and nothing changes.

With Beam's defaults over a local folder the command forks the pool before it even imports
Beam, and gives the workers the first files of the folder's listing to begin with (the *head
start*): importing Beam, building the graph, starting the runner and listing the folder again
take 1.5-2 s, during which the workers used to wait. The pipeline then *claims* those files
(``submit`` finds the answer, or waits for it) like any other.

Each worker has its own pipe and answers in the order it was asked, with at most
``depth`` files outstanding; there is no helper thread on either side once the pipeline
runs (with a ``ProcessPoolExecutor``, whose feeder and manager threads compete with the DoFn's
thread for the GIL, the command's own process used 3.3-3.9 s of CPU on 4,808 files instead of
2.7-2.8 s, 27 November 2026); during a head start one thread reads the answers until the
pipeline's first claim. A worker that dies (a native crash in a codec, the
kernel's out-of-memory killer, a stray ``kill``) had exactly one file in hand, the oldest it
had not answered: that file gets a ``failed`` row (``internal_error``, how the worker
ended), the files queued behind it go to the other workers, and a replacement (a fresh interpreter)
takes its place (:meth:`LocalPool._start_replacement`);
only if that fails is the rest of the run processed in the Beam process itself. A file still
in hand after ``file_timeout`` seconds (a codec caught in a loop) fails with ``timeout``: its
worker is killed and replaced. Workers are killed with the command (``PR_SET_PDEATHSIG``).
Before the pool, a native crash ended the run.
"""

from __future__ import annotations

import collections
import contextlib
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from typing import Any, Hashable

from transforms.errors import DeidError

__all__ = [
    "DEFAULT_FILE_TIMEOUT", "FileTimedOut", "LocalPool", "WorkerLost", "cgroup_cpu_quota", "default_processes",
    "pool_for",
]

_POOLS: dict[str, LocalPool] = {}
_POOLS_LOCK = threading.Lock()
_CLOSE_TIMEOUT = 60.0  # seconds a worker may take to finish its file when the run ends
#: Seconds a stopped run's workers (Ctrl-C, a failure: no more rows are written) get to finish
#: the file in hand before they are killed.
STOPPED_RUN_GRACE = 5.0
#: Deferred while the pool forks (:func:`_stop_signals_deferred`): the command's stop signals.
_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_START_TIMEOUT = 120.0  # seconds a replacement worker may take to import the core


#: Seconds a worker may spend on one file before it is stopped and the file fails (``timeout``).
DEFAULT_FILE_TIMEOUT = 900.0

_SIGNAL_CAUSES = {
    signal.SIGKILL: "SIGKILL: the out-of-memory killer or kill -9",
    signal.SIGSEGV: "SIGSEGV: a native crash",
    signal.SIGBUS: "SIGBUS: a native crash",
    signal.SIGABRT: "SIGABRT: a native abort",
    signal.SIGILL: "SIGILL: a native crash",
    signal.SIGFPE: "SIGFPE: a native crash",
}


class WorkerLost(DeidError):
    """The worker process that had this file in hand ended before answering."""

    reason = "internal_error"

    def __init__(self, exitcode: int | None = None) -> None:
        if exitcode is not None and exitcode < 0:
            how = f"was killed by signal {-exitcode} ({_SIGNAL_CAUSES.get(-exitcode, 'a signal')})"
        elif exitcode is not None:
            how = f"ended with status {exitcode}"
        else:
            how = "ended (native crash, out-of-memory kill or signal)"
        super().__init__(f"the worker process {how} while processing this file")


class FileTimedOut(WorkerLost):
    """The file took its worker longer than the run's per-file deadline: the worker was killed."""

    reason = "timeout"

    def __init__(self, seconds: float) -> None:
        DeidError.__init__(
            self,
            f"processing took more than {seconds:g} s (--file-timeout): the worker process was stopped"
        )


def usable_cpus() -> int:
    """The CPUs this process may use: those it may run on, capped by a container's CPU quota
    (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``); at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def default_processes() -> int:
    """:func:`usable_cpus`; 0 (no pool) for one CPU, where it buys nothing, and off Linux
    (macOS frameworks do not survive a fork)."""
    if not sys.platform.startswith("linux"):
        return 0
    cpus = usable_cpus()
    return cpus if cpus > 1 else 0


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs' worth of time the container may use per period (e.g. 1.5), None without a limit.

    Read from the cgroup v2 root's ``cpu.max`` (``"150000 100000"``; ``"max ..."``: none) or
    cgroup v1's ``cpu/cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (-1: none); the files that
    a container sees for itself at its cgroup mount.
    """
    try:
        with open(os.path.join(root, "cpu.max"), encoding="ascii") as f:
            quota, _, period = f.read().strip().partition(" ")
        if quota != "max":
            return int(quota) / int(period or 100000)
        return None
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us"), encoding="ascii") as f:
            quota_us = int(f.read().strip())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us"), encoding="ascii") as f:
            period_us = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def pool_for(run_id: str) -> LocalPool | None:
    """The pool started for ``run_id`` in this process, if any."""
    return _POOLS.get(run_id)


@contextlib.contextmanager
def _stop_signals_deferred() -> Iterator[None]:
    """Ctrl-C, SIGTERM or SIGHUP arriving inside the block is noted, then delivered again to
    its own handler when the block ends.

    The command's handler raises KeyboardInterrupt; run inside one of the at-fork hooks that
    every fork calls (logging's), that exception is dropped by CPython, and the run went on to
    exit 0 (found by a review). Blocking the signals would not do: another thread may take
    them, and Python runs the handler in the main thread all the same. Off the main thread
    (where handlers cannot be set) the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}
    try:
        for signum in _DEFERRED_SIGNALS:
            handler = signal.getsignal(signum)
            if handler is not None and handler is not signal.SIG_IGN:  # (None: set outside Python)
                previous[signum] = signal.signal(signum, lambda number, frame: caught.append(number))
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            signal.raise_signal(caught[0])


def _die_with_parent(parent_pid: int) -> None:
    """End with a SIGKILL when the parent ends (Linux ``PR_SET_PDEATHSIG``): a worker stuck
    inside one file would otherwise outlive a killed command; one that is not stuck notices
    the parent's end between files anyway, but the file in hand would get no audit row."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent ended before the call
        os._exit(0)


def _worker_main(conn: Connection, inherited: list[Connection], cfg: Any, key: Any,
                 head_start: list[tuple[str, int]], parent_pid: int | None, announce: bool = False) -> None:
    # The parent's ends of this and the earlier workers' pipes came with the fork: close them,
    # so that only the parent holds them and its death means end-of-file in every worker.
    for other in inherited:
        other.close()
    # Ctrl-C and a hangup reach the whole process group: the parent stops the pool after the
    # file each worker has in hand. SIGTERM: the parent's handler (raise KeyboardInterrupt)
    # would unwind a worker mid-file; the default (end) is what a signal to a worker means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if parent_pid is not None:
        # Not in a replacement (parent_pid None): the signal comes when the *thread* that
        # started the process ends, and that may be one of Beam's; it ends on EOF between files.
        _die_with_parent(parent_pid)
    from transforms.files import forget_clients, process_file, quiet_pydicom_warnings

    quiet_pydicom_warnings()
    forget_clients()  # a gs:// key file was read with a client the parent goes on using
    if announce:
        try:
            conn.send("ready")
        except OSError:
            return
    debug = os.environ.get("DICOM_DEID_DEBUG") == "1"
    # Files in the order the parent expects their answers: the head start, then what it sends.
    todo: collections.deque = collections.deque(head_start)
    while True:
        try:
            # Between files of the head start only what has already arrived, else wait.
            while not todo or conn.poll():
                message = conn.recv()
                if message is None:
                    return  # stop (after the file in hand, answered)
                todo.append(message)
        except (EOFError, OSError):
            return  # the parent is gone
        path, size = todo.popleft()
        matched: list[int] = []
        try:
            audit, crosswalk = process_file(path, size, cfg, key, matched=matched)
            reply: Any = (audit, crosswalk, matched)
        except BaseException as exc:  # noqa: BLE001 - a bug in the row builder: the run must fail
            # The type only, as the command prints it; the traceback (which may quote data)
            # only under DICOM_DEID_DEBUG=1, as in the parent.
            reply = f"{type(exc).__name__}" + (f"\n{traceback.format_exc()}" if debug else "")
        try:
            # At once: the parent relies on the oldest unanswered file being the one in hand.
            conn.send(reply)
        except OSError:
            return  # the parent is gone (no traceback on a terminal it left)


class _Spawned:
    """A replacement worker's ``subprocess.Popen`` with the few calls of
    ``multiprocessing.Process`` the pool makes."""

    __slots__ = ("_popen", "pid")

    def __init__(self, popen: subprocess.Popen) -> None:
        self._popen = popen
        self.pid = popen.pid

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self._popen.poll() is None:
            self._popen.kill()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()  # (negative: the signal, as multiprocessing says it)


def _replacement_main(fd: int) -> None:
    """``python -m transforms.workers FD``: a replacement worker (:meth:`LocalPool._start_replacement`)."""
    conn = Connection(fd)
    try:
        cfg, key = conn.recv()
    except (EOFError, OSError):
        return
    _worker_main(conn, [], cfg, key, [], None, announce=True)


class _Job:
    """A file sent to a worker; ``owner`` is None for a head-start file nobody claimed yet."""

    __slots__ = ("owner", "path", "size")

    def __init__(self, owner: Hashable | None, path: str, size: int) -> None:
        self.owner = owner
        self.path = path
        self.size = size


class _Worker:
    __slots__ = ("process", "conn", "outstanding", "started", "answered", "replacement")

    def __init__(self, process: Any, conn: Connection, replacement: bool = False) -> None:
        self.process = process
        self.conn = conn
        self.answered = 0
        self.replacement = replacement  # started after a worker was lost (_start_replacement)
        self.outstanding: collections.deque = collections.deque()  # _Job, in the order answered
        self.started = time.monotonic()  # when the file in hand (outstanding[0]) was begun


def _file_key(path: str, size: int) -> tuple[str, int | None]:
    """What identifies a listed file between the head start's listing and the pipeline's: its
    path, and its size only when that is a marker (``UNREADABLE_NAME``: a name that is not
    UTF-8, shown with ``\\xNN`` escapes, which another file's real name may spell out). A
    real size is left out: a file that grew between the two listings is still one file."""
    return (path, size if size < 0 else None)


class LocalPool:
    """``processes`` forked workers de-identifying files for one run (see the module doc).

    Create it before Beam starts any thread (the command does so before it imports Beam, or
    right before the pipeline runs); :meth:`close` it after the run. Registered under
    ``cfg.run_id`` for :func:`pool_for`. Thread-safe: DoFns on several threads
    (``multi_threading``) share it, each collecting its own files' results (``owner``).

    ``head_start``: files the workers begin with at once, dealt out in turn (worker *i* gets
    every *n*-th), while the command is still importing Beam and building the pipeline (~1.5 s
    of one CPU); the DoFn later *claims* each of them with :meth:`submit` like any file. They
    must be files the pipeline's own listing yields: one it never claims (the folder changed in
    between) is processed anyway, and :meth:`close` returns its result for the audit.
    """

    def __init__(self, cfg: Any, key: Any, processes: int, depth: int = 3,
                 head_start: list[tuple[str, int]] | None = None,
                 file_timeout: float | None = DEFAULT_FILE_TIMEOUT, replace: bool = True) -> None:
        if processes < 1 or depth < 1:
            raise ValueError("LocalPool: processes and depth must be at least 1")
        if file_timeout is not None and not file_timeout > 0:
            raise ValueError("LocalPool: file_timeout must be positive (or None)")
        self.run_id = cfg.run_id
        self.processes = processes
        self.depth = depth
        self.file_timeout = file_timeout
        self._cfg, self._key = cfg, key
        self._replace = replace  # start a new worker for each lost one (off once that fails)
        self.replaced = 0
        self._lock = threading.RLock()
        self._done: dict[Hashable, list[tuple[str, int, Any]]] = collections.defaultdict(list)
        self._outstanding: collections.Counter = collections.Counter()  # owner -> files not yet answered
        self._workers: list[_Worker] = []
        # Head-start files not claimed yet, and their (size, answer) until claimed (_file_key).
        self._head: dict[tuple[str, int | None], _Job] = {}
        self._unclaimed: dict[tuple[str, int | None], tuple[int, Any]] = {}
        self._drainer: threading.Thread | None = None  # reads head-start answers until the first claim
        self._stop_draining = threading.Event()
        self._drain_error: BaseException | None = None
        ctx = multiprocessing.get_context("fork")
        head_start = list({_file_key(*f): f for f in head_start or ()}.values())  # (one job per file)
        try:
            with _stop_signals_deferred():
                self._fork_all(ctx, processes, head_start, cfg, key)
        except BaseException:
            self.close()
            raise
        if self._head:
            # Until the pipeline asks for its first file, this thread reads the answers (a
            # worker's socket holds ~150 of them), while the main thread imports Beam.
            self._drainer = threading.Thread(target=self._drain, name="dicom-deid-head-start", daemon=True)
            self._drainer.start()
        with _POOLS_LOCK:
            _POOLS[self.run_id] = self

    def _fork_all(self, ctx: Any, processes: int, head_start: list[tuple[str, int]], cfg: Any, key: Any) -> None:
        """Fork the ``processes`` workers, each with its share of the head-start files."""
        parent_ends: list[Connection] = []
        for number in range(processes):
            share = head_start[number::processes]
            parent_end, child_end = ctx.Pipe(duplex=True)
            process = ctx.Process(
                target=_worker_main,
                args=(child_end, parent_ends + [parent_end], cfg, key, share, os.getpid()),
                name=f"dicom-deid-worker-{number}",
                daemon=True,
            )
            process.start()
            child_end.close()
            parent_ends.append(parent_end)
            worker = _Worker(process, parent_end)
            for path, size in share:
                job = self._head[_file_key(path, size)] = _Job(None, path, size)
                worker.outstanding.append(job)
            self._workers.append(worker)

    def _drain(self) -> None:
        try:
            while not self._stop_draining.is_set():
                with self._lock:
                    conns = [w.conn for w in self._workers if w.outstanding]
                if not conns:
                    return
                if wait(conns, timeout=0.05):
                    with self._lock:
                        self._receive(block=False)
        except BaseException as exc:  # noqa: BLE001 - raised again by the next submit/take
            self._drain_error = exc

    @property
    def alive(self) -> bool:
        """Whether any worker is left (if not, callers process files themselves)."""
        return bool(self._workers)

    def submit(self, owner: Hashable, path: str, size: int) -> bool:
        """Claim a head-start file, or queue one file on the least busy worker, first
        collecting answers while every worker has ``depth`` files. Returns False when no
        worker is left (process it yourself)."""
        self._start_reading()
        with self._lock:
            job = self._head.pop(_file_key(path, size), None)
            if job is not None:
                answered = self._unclaimed.pop(_file_key(path, size), None)
                if answered is not None:
                    self._done[owner].append((path, *answered))
                else:
                    job.owner = owner
                    self._outstanding[owner] += 1
                return True
            while self._workers:
                worker = min(self._workers, key=lambda w: len(w.outstanding))
                if len(worker.outstanding) < self.depth:
                    if self._send(worker, owner, path, size):
                        return True
                    continue
                self._receive(block=True)
            return False

    def take(self, owner: Hashable, *, all_of_them: bool = False) -> list[tuple[str, int, Any]]:
        """The finished files of ``owner`` as ``(path, size, result)``, where ``result`` is
        ``(audit, crosswalk, matched)`` or a :class:`WorkerLost`; with ``all_of_them``, waits
        until none of its files is outstanding.

        Raises:
            RuntimeError: a worker hit an unexpected error building a row (a bug).
        """
        self._start_reading()
        with self._lock:
            self._receive(block=False)
            # (Once closed, no worker is left to wait for: what is missing stays missing.)
            while all_of_them and self._outstanding[owner] and any(w.outstanding for w in self._workers):
                self._receive(block=True)
            return self._done.pop(owner, [])

    def _start_reading(self) -> None:
        """The caller reads the answers from now on: stop the head-start thread (not holding
        the lock, which that thread takes)."""
        if self._drainer is not None and self._drainer is not threading.current_thread():
            self._stop_draining.set()
            self._drainer.join()
            self._drainer = None
        if self._drain_error is not None:
            error, self._drain_error = self._drain_error, None
            raise error

    def _send(self, worker: _Worker, owner: Hashable, path: str, size: int) -> bool:
        try:
            worker.conn.send((path, size))
        except (OSError, EOFError):
            self._lose(worker)
            return False
        if not worker.outstanding:
            worker.started = time.monotonic()  # idle until now: this file is begun at once
        worker.outstanding.append(_Job(owner, path, size))
        self._outstanding[owner] += 1
        return True

    def _answered(self, job: _Job, reply: Any) -> None:
        if isinstance(reply, str):
            raise RuntimeError(f"in a worker process: {reply}")
        if job.owner is None:
            self._unclaimed[_file_key(job.path, job.size)] = (job.size, reply)
        else:
            self._outstanding[job.owner] -= 1
            self._done[job.owner].append((job.path, job.size, reply))

    def _receive(self, *, block: bool) -> None:
        busy = [w for w in self._workers if w.outstanding]
        if not busy:
            return
        timeout: float | None = None if block else 0
        if block and self.file_timeout is not None:
            # Wake up when the earliest file in hand reaches its deadline.
            first = min(w.started for w in busy) + self.file_timeout
            timeout = max(0.0, first - time.monotonic())
        ready = wait([w.conn for w in busy], timeout=timeout)
        for worker in busy:
            if worker not in self._workers:  # (lost meanwhile: _lose resubmits)
                continue
            if worker.conn not in ready:
                if self.file_timeout is not None and time.monotonic() - worker.started > self.file_timeout:
                    worker.process.kill()  # stuck: a loop in a codec, a read that never returns
                    self._lose(worker, FileTimedOut(self.file_timeout))
                continue
            try:
                while True:
                    reply = worker.conn.recv()
                    self._answered(worker.outstanding.popleft(), reply)
                    worker.answered += 1
                    worker.started = time.monotonic()  # the next file (if any) is begun now
                    if not (worker.outstanding and worker.conn.poll()):
                        break
            except (EOFError, OSError):
                self._lose(worker)

    def _lose(self, worker: _Worker, failure: BaseException | None = None) -> None:
        """``worker`` died (or was stopped: ``failure``): its file in hand fails, the ones
        queued behind it move on (an unclaimed head-start file goes back to being an ordinary
        file)."""
        if worker not in self._workers:
            return
        self._workers.remove(worker)
        worker.conn.close()
        worker.process.join(timeout=5)
        exitcode = worker.process.exitcode
        queued = list(worker.outstanding)
        worker.outstanding.clear()
        if worker.replacement and not worker.answered and failure is None and (exitcode is None or exitcode >= 0):
            self._replace = False  # a new worker that ended by itself before any file: do not loop
        if self._replace:
            self._start_replacement()
        if queued:
            self._answered(queued[0], failure or WorkerLost(exitcode))
        for job in queued[1:]:
            if job.owner is not None:
                self._outstanding[job.owner] -= 1
        for job in queued[1:]:
            if job.owner is None:
                self._head.pop(_file_key(job.path, job.size), None)
            elif not self.submit(job.owner, job.path, job.size):
                self._done[job.owner].append((job.path, job.size, None))  # no worker left: the caller runs it

    def _start_replacement(self) -> None:
        """A new worker in place of a lost one: a fresh interpreter (``python -m
        transforms.workers``), which receives the request and the key pickled through its
        socket (never on a command line or a disk) and says when it is ready, before any file
        is given to it. Not a fork of this process, whose Beam threads a fork would copy
        mid-flight (a lock one of them holds stays held forever in the child), and not the
        standard library's fork server, which runs the main script again in each child. Without
        replacements, the last worker's loss left the files to Beam's process, where the next
        native crash ended the run. If a replacement cannot start, none is tried again."""
        parent_sock, child_sock = socket.socketpair()
        process = None
        try:
            # The code this process runs, first on the path; -P: not the current folder (a
            # "transforms" package of the user's own would be imported instead).
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            try:
                process = _Spawned(subprocess.Popen(
                    [sys.executable, "-P", "-m", "transforms.workers", str(child_sock.fileno())],
                    pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONPATH": path},
                ))
            finally:
                child_sock.close()
            conn = Connection(parent_sock.detach())
            conn.send((self._cfg, self._key))
            if not conn.poll(_START_TIMEOUT) or conn.recv() != "ready":
                raise EOFError
        except Exception:  # noqa: BLE001 - no interpreter, a process limit, a failed start: go on without
            parent_sock.close()
            if process is not None:
                process.kill()
                process.join()
            self._replace = False
            return
        self.replaced += 1
        self._workers.append(_Worker(process, conn, replacement=True))

    def close(self, grace: float | None = None) -> list[tuple[str, int, Any]]:
        """Stop the workers once their current file is done (within ``grace`` seconds, default
        ``_CLOSE_TIMEOUT``; then they are killed); unregister.

        Returns:
            The head-start files that were processed but never claimed, as
            ``(path, size, result)``: the caller writes their audit rows.
        """
        with _POOLS_LOCK:
            if _POOLS.get(self.run_id) is self:
                del _POOLS[self.run_id]
        self._stop_draining.set()
        if self._drainer is not None:
            self._drainer.join()
            self._drainer = None
        with self._lock:
            workers, self._workers = self._workers, []
            for worker in workers:
                try:
                    worker.conn.send(None)  # (a worker answers what it has done, then ends)
                except (OSError, EOFError):
                    pass
            deadline = time.monotonic() + (_CLOSE_TIMEOUT if grace is None else grace)
            for worker in workers:
                try:
                    while worker.outstanding and worker.conn.poll(max(0.0, deadline - time.monotonic())):
                        self._answered(worker.outstanding.popleft(), worker.conn.recv())
                except (EOFError, OSError, RuntimeError):
                    pass  # ended (or failed) without answering the rest: those files were not done
                worker.outstanding.clear()
            orphans = [(path, size, result) for (path, _), (size, result) in self._unclaimed.items()]
            self._unclaimed.clear()
            self._head.clear()
        for worker in workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        return orphans

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    _replacement_main(int(sys.argv[1]))
