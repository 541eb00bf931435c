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

Each worker has its own pipe and answers in the order it was asked, with at most
``depth`` files outstanding; there is no helper thread on either side (with a
``ProcessPoolExecutor``, whose feeder and manager threads compete with the DoFn's thread for
the GIL, the command's own process used 3.3-3.9 s of CPU on 4,808 files instead of 2.7-2.8 s,
27 November 2026). A worker that dies (a native crash in a codec, the
kernel's out-of-memory killer, a stray ``kill``) had exactly one file in hand, the oldest it
had not answered: that file gets a ``failed`` row (``internal_error``, "worker process
ended"), the files queued behind it go to the other workers, and once none is left the rest
of the run is processed in the Beam process itself. Before the pool, such a crash ended the
run.
"""

from __future__ import annotations

import collections
import math
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Hashable

from transforms.errors import DeidError

__all__ = ["LocalPool", "WorkerLost", "cgroup_cpu_quota", "default_processes", "pool_for"]

_POOLS: dict[str, LocalPool] = {}
_POOLS_LOCK = threading.Lock()
_CLOSE_TIMEOUT = 60.0  # seconds a worker may take to finish its file when the run stops


class WorkerLost(DeidError):
    """The worker process that had this file in hand ended before answering."""

    reason = "internal_error"

    def __init__(self) -> None:
        super().__init__(
            "the worker process ended while processing this file (native crash, out-of-memory kill or signal)"
        )


def default_processes() -> int:
    """The CPUs this process may use: those it may run on, capped by a container's CPU quota
    (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``); 0 (no pool) for one CPU, where it
    buys nothing, and off Linux (macOS frameworks do not survive a fork)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
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


def _worker_main(conn: Connection, inherited: list[Connection], cfg: Any, key: Any) -> None:
    # The parent's ends of this and the earlier workers' pipes came with the fork: close them,
    # so that only the parent holds them and its death means end-of-file in every worker.
    for other in inherited:
        other.close()
    # Ctrl-C reaches the whole process group: the parent stops the pool after the file each
    # worker has in hand. SIGTERM: the parent's handler (raise KeyboardInterrupt) would unwind
    # a worker mid-file; the default (end) is what a signal to a worker means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from transforms.files import forget_clients, process_file, quiet_pydicom_warnings

    quiet_pydicom_warnings()
    forget_clients()  # a gs:// key file was read with a client the parent goes on using
    debug = os.environ.get("DICOM_DEID_DEBUG") == "1"
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if message is None:
            return
        path, size = message
        matched: list[int] = []
        try:
            audit, crosswalk = process_file(path, size, cfg, key, matched=matched)
            reply: Any = (audit, crosswalk, matched)
        except BaseException as exc:  # noqa: BLE001 - a bug in the row builder: the run must fail
            # The type only, as the command prints it; the traceback (which may quote data)
            # only under DICOM_DEID_DEBUG=1, as in the parent.
            reply = f"{type(exc).__name__}" + (f"\n{traceback.format_exc()}" if debug else "")
        try:
            conn.send(reply)
        except OSError:
            return  # the parent is gone (no traceback on a terminal it left)


class _Worker:
    __slots__ = ("process", "conn", "outstanding")

    def __init__(self, process: Any, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.outstanding: collections.deque = collections.deque()  # (owner, path, size), in send order


class LocalPool:
    """``processes`` forked workers de-identifying files for one run (see the module doc).

    Create it before Beam starts any thread (the command does so right before the pipeline
    runs); :meth:`close` it after the run. Registered under ``cfg.run_id`` for
    :func:`pool_for`. Thread-safe: DoFns on several threads (``multi_threading``) share it,
    each collecting its own files' results (``owner``).
    """

    def __init__(self, cfg: Any, key: Any, processes: int, depth: int = 3) -> None:
        if processes < 1 or depth < 1:
            raise ValueError("LocalPool: processes and depth must be at least 1")
        self.run_id = cfg.run_id
        self.processes = processes
        self.depth = depth
        self._lock = threading.RLock()
        self._done: dict[Hashable, list[tuple[str, int, Any]]] = collections.defaultdict(list)
        self._outstanding: collections.Counter = collections.Counter()  # owner -> files not yet answered
        self._workers: list[_Worker] = []
        ctx = multiprocessing.get_context("fork")
        parent_ends: list[Connection] = []
        try:
            for number in range(processes):
                parent_end, child_end = ctx.Pipe(duplex=True)
                process = ctx.Process(
                    target=_worker_main,
                    args=(child_end, parent_ends + [parent_end], cfg, key),
                    name=f"dicom-deid-worker-{number}",
                    daemon=True,
                )
                process.start()
                child_end.close()
                parent_ends.append(parent_end)
                self._workers.append(_Worker(process, parent_end))
        except BaseException:
            self.close()
            raise
        with _POOLS_LOCK:
            _POOLS[self.run_id] = self

    @property
    def alive(self) -> bool:
        """Whether any worker is left (if not, callers process files themselves)."""
        return bool(self._workers)

    def submit(self, owner: Hashable, path: str, size: int) -> bool:
        """Queue one file on the least busy worker, first collecting answers while every worker
        has ``depth`` files. Returns False when no worker is left (process it yourself)."""
        with self._lock:
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
        with self._lock:
            self._receive(block=False)
            # (Once closed, no worker is left to wait for: what is missing stays missing.)
            while all_of_them and self._outstanding[owner] and any(w.outstanding for w in self._workers):
                self._receive(block=True)
            return self._done.pop(owner, [])

    def _send(self, worker: _Worker, owner: Hashable, path: str, size: int) -> bool:
        try:
            worker.conn.send((path, size))
        except (OSError, EOFError):
            self._lose(worker)
            return False
        worker.outstanding.append((owner, path, size))
        self._outstanding[owner] += 1
        return True

    def _receive(self, *, block: bool) -> None:
        busy = [w for w in self._workers if w.outstanding]
        if not busy:
            return
        ready = wait([w.conn for w in busy], timeout=None if block else 0)
        for worker in busy:
            if worker.conn not in ready or worker not in self._workers:  # (lost meanwhile: _lose resubmits)
                continue
            try:
                while True:
                    reply = worker.conn.recv()
                    owner, path, size = worker.outstanding.popleft()
                    self._outstanding[owner] -= 1
                    if isinstance(reply, str):
                        raise RuntimeError(f"in a worker process: {reply}")
                    self._done[owner].append((path, size, reply))
                    if not (worker.outstanding and worker.conn.poll()):
                        break
            except (EOFError, OSError):
                self._lose(worker)

    def _lose(self, worker: _Worker) -> None:
        """``worker`` died: its file in hand fails, the ones queued behind it move on."""
        if worker not in self._workers:
            return
        self._workers.remove(worker)
        worker.conn.close()
        worker.process.join(timeout=5)
        queued = list(worker.outstanding)
        worker.outstanding.clear()
        for owner, _, _ in queued:
            self._outstanding[owner] -= 1
        if queued:
            owner, path, size = queued[0]
            self._done[owner].append((path, size, WorkerLost()))
        for owner, path, size in queued[1:]:
            if not self.submit(owner, path, size):
                self._done[owner].append((path, size, None))  # no worker left: the caller runs it

    def close(self) -> None:
        """Stop the workers once their current file is done; unregister."""
        with _POOLS_LOCK:
            if _POOLS.get(self.run_id) is self:
                del _POOLS[self.run_id]
        with self._lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            try:
                worker.conn.send(None)
            except (OSError, EOFError):
                pass
        for worker in workers:
            worker.process.join(timeout=_CLOSE_TIMEOUT)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
