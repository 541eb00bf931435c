"""The Beam shell around the pure core: one DoFn per input file, failures as audit rows.

Element shapes:

- ``ExpandInput``: ``str`` (a file, folder, glob, ``gs://`` prefix or glob) -> ``(uri, size)``.
- ``DeidentifyInstances``: ``(uri, size)`` -> ``DeidentifyOutputs(audit, crosswalk)`` where
  ``audit`` holds exactly one ``schemas.audit.audit_row`` dict per input file and ``crosswalk``
  one ``crosswalk_row`` dict per written file (only when the run asked for a crosswalk).

The per-file work is the plain function :func:`process_file` (= :func:`prepare_file`, the CPU
part, then :func:`finish_file`, hashing and publishing); the DoFn adds the key, counters,
progress, and runs ``finish_file`` on a writer thread that overlaps the next file's CPU work.
In a local run the command may have started a :class:`transforms.workers.LocalPool` for the
run in this process: the DoFn then hands each file to it and emits the rows it sends back.
Every exception raised while processing a file becomes a ``failed`` row
(dead letter as data): ``DeidError.reason`` for the core's own errors, ``too_deep`` for
``RecursionError``, ``too_large`` for ``MemoryError``, ``read_error``/``write_error`` for I/O
errors and ``internal_error`` (with the exception *type* only: messages may quote data)
for anything else. A bug in the row builder itself still fails the pipeline.

The per-file work, publishing and the memory budget live in :mod:`transforms.files` (no
Beam import at module level: the one-file command runs without loading Beam); the names are
re-exported here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import sys
import threading
from typing import Any, Iterable, Iterator, NamedTuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from schemas.audit import FAILED, SKIPPED, WRITTEN
from transforms.files import (  # noqa: F401 - re-exported: the per-file API as seen from the Beam shell
    TMP_DIR_NAME,
    DuplicateInstanceError,
    MemoryBudget,
    budget_hold,
    ProgressFile,
    RunConfig,
    _gcs_client,
    _input_pattern,
    _is_input,
    _match_streaming,
    default_memory_budget,
    expand_input,
    failed_row,
    failure_reason,
    finish_file,
    gcs_first_level,
    gcs_under,
    is_local,
    list_gcs,
    listing_prefix,
    load_key_uri,
    lost_file_matches,
    output_name,
    pattern_matcher,
    prepare_file,
    process_budget,
    process_file,
    publish,
    quiet_pydicom_warnings,
    UNLISTABLE_FOLDER,
    read_bounded,
    read_progress,
    remove_local_tmp,
    safe_str,
    safe_transfer_syntax,
)
from transforms.workers import LocalPool, WorkerLost, pool_for

CROSSWALK_TAG = "crosswalk"
MATCHED_TAG = "matched_resources"
PREFIX_TAG = "prefixes"  # ExpandInputFn -> ListPrefixFn
AUDIT_TAG = "audit"
_METRICS_NAMESPACE = "dicom_deid"
_SWITCH_INTERVAL = 0.0002  # seconds; see DeidentifyFn.setup


# --------------------------------------------------------------------------- input expansion


class ExpandInputFn(beam.DoFn):
    """``str`` INPUT -> ``(path, size)`` per file (I/O at run time, not at construction).

    A ``gs://`` INPUT is listed one level deep here (``delimiter="/"``): the objects directly
    under its prefix are yielded, each deeper prefix goes to ``PREFIX_TAG`` as
    ``(pattern, prefix)`` for :class:`ListPrefixFn`, so a bucket of millions of objects is
    listed by many workers instead of one (a GCS listing returns 1,000 names per request).
    """

    def __init__(self, fan_out: bool = True) -> None:
        super().__init__()
        self._fan_out = fan_out

    def process(self, uri: str) -> Iterator[Any]:
        pattern = _input_pattern(uri) if self._fan_out and uri.startswith("gs://") else None
        client = _gcs_client(pattern) if pattern is not None else None
        if client is None:
            yield from expand_input(uri)
            return
        for path, size in gcs_first_level(client, pattern):
            if size is None:  # a "folder" where objects of the pattern may lie
                yield pvalue.TaggedOutput(PREFIX_TAG, (pattern, path))
            elif _is_input(path, size):
                yield path, size


class ListPrefixFn(beam.DoFn):
    """``(pattern, gs:// prefix)`` -> ``(path, size)`` of every object under the prefix that
    matches the pattern (page by page)."""

    def process(self, element: tuple[str, str]) -> Iterator[tuple[str, int]]:
        pattern, prefix = element
        client = _gcs_client(prefix)  # present: ExpandInputFn only fans out when it had one
        try:
            for path, size in gcs_under(client, pattern, prefix):
                if _is_input(path, size):
                    yield path, size
        except Exception:  # noqa: BLE001 - after the client's own retries (a denied or lost prefix)
            # The prefix gets its read_error row, as an unlistable local folder does; the run
            # goes on with the others (the objects listed before the failure keep their rows).
            yield prefix, UNLISTABLE_FOLDER


# --------------------------------------------------------------------------- DoFn / PTransforms


class DeidentifyFn(beam.DoFn):
    """``(path, size)`` -> one audit row dict; crosswalk rows on ``CROSSWALK_TAG``.

    Each file is prepared (read, parsed, de-identified, encoded) in ``process`` and finished
    (hashed, published) on a writer thread while the next files are prepared: SHA-256 and
    file or object-store I/O release the GIL, so they overlap the CPU-bound core instead of
    adding to it. At most ``_MAX_PENDING`` files (and ``_MAX_PENDING_BYTES`` of output) wait
    for the writer; rows are emitted as files finish, and ``finish_bundle`` waits for the rest,
    so a bundle's outputs are all on storage before Beam commits the bundle. Every DoFn of the
    process shares one :class:`MemoryBudget` of input bytes in flight.

    When the command started a :class:`transforms.workers.LocalPool` for this run in this
    process (local runs), each file goes to the pool instead, whose workers run
    :func:`process_file` whole; the rows come back as they finish, ``finish_bundle`` waits for
    the rest of the bundle's, and a file whose worker died gets a ``failed`` row.
    """

    _MAX_PENDING = 8
    _MAX_PENDING_BYTES = 256 << 20

    def __init__(self, cfg: RunConfig) -> None:
        self._cfg = cfg
        self._key: Any = None
        self._progress: ProgressFile | None = None
        self._counters = {s: Metrics.counter(_METRICS_NAMESPACE, s) for s in (WRITTEN, FAILED, SKIPPED)}
        self._bytes_in = Metrics.distribution(_METRICS_NAMESPACE, "bytes_in")
        self._writer: Any = None
        self._pending: collections.deque = collections.deque()
        self._pending_bytes = 0
        self._matched_seen: set[int] = set()
        self._budget: MemoryBudget | None = None
        self._pool: LocalPool | None = None
        self._live = False

    def setup(self) -> None:
        quiet_pydicom_warnings()
        cfg = self._cfg
        self._key = cfg.key if cfg.key is not None else load_key_uri(cfg.key_uri)
        if self._key.key_id != cfg.key_id:
            raise RuntimeError(
                f"the key read by this worker has id {self._key.key_id}, the run was started with {cfg.key_id}: "
                "the key file changed during the run"
            )
        if cfg.progress_dir and os.path.isdir(cfg.progress_dir):
            self._progress = ProgressFile(cfg.progress_dir)
        self._budget = process_budget(cfg.memory_budget)
        self._pool = pool_for(cfg.run_id)
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dicom-deid-writer")
        if self._pool is None:  # with a pool, this thread mostly waits for its workers
            self._live = True
            _count_live_fns(+1)

    def start_bundle(self) -> None:
        self._pending = collections.deque()
        self._pending_bytes = 0
        self._matched_seen: set[int] = set()

    def process(self, element: tuple[str, int]) -> Iterator[Any]:
        path, size = element
        pool = self._pool
        # No MemoryBudget for the pool: each of its workers holds one file at a time, in a
        # process of its own; what waits for them are (path, size) pairs.
        if pool is not None and pool.submit(id(self), path, size):
            yield from self._collect(pool.take(id(self)), windowed=False)
        else:
            yield from self._process_here(path, size)

    def _process_here(self, path: str, size: int) -> Iterator[Any]:
        matched: list[int] = []
        # Held from before the read until the output is on storage; a file over --max-bytes
        # is refused unread and holds nothing.
        held = int(size) if 0 < size <= self._cfg.max_bytes else 0
        with budget_hold(self._budget, held) as hold:  # (grown while a Transcode decodes)
            prepared = prepare_file(path, size, self._cfg, self._key, matched=matched)
        if isinstance(prepared, tuple):
            hold.release()
        yield from self._matched(matched, windowed=False)
        if isinstance(prepared, tuple):
            yield from self._emit(*prepared, windowed=False)
        else:
            nbytes = prepared.size
            try:
                future = self._writer.submit(finish_file, prepared)
            except (AttributeError, RuntimeError):
                # Torn down under us (Ctrl-C with multi_threading: Beam tears the DoFn down while
                # another thread is still in process()): finish here, without a traceback.
                try:
                    yield from self._emit(*finish_file(prepared), windowed=False)
                finally:
                    hold.release()
                return
            future.add_done_callback(lambda _done, hold=hold: hold.release())
            self._pending.append((future, nbytes))
            self._pending_bytes += nbytes
        pending = self._pending
        while pending and (
            pending[0][0].done() or len(pending) > self._MAX_PENDING or self._pending_bytes > self._MAX_PENDING_BYTES
        ):
            future, nbytes = pending.popleft()
            self._pending_bytes -= nbytes
            yield from self._emit(*future.result(), windowed=False)

    def _collect(self, finished: list[tuple[str, int, Any]], *, windowed: bool) -> Iterator[Any]:
        """Emit the rows of files the pool finished (``LocalPool.take``)."""
        for path, size, result in finished:
            if result is None:  # its worker died and no other is left: process it here
                outputs = self._process_here(path, size)
                yield from (_in_global_window(value) for value in outputs) if windowed else outputs
                continue
            if isinstance(result, WorkerLost):
                audit, crosswalk = failed_row(path, size, self._cfg, result, "process"), None
                matched = lost_file_matches(path, size, self._cfg)
            else:
                audit, crosswalk, matched = result
            yield from self._matched(matched, windowed=windowed)
            yield from self._emit(audit, crosswalk, windowed=windowed)

    def _matched(self, positions: Iterable[int], *, windowed: bool) -> Iterator[Any]:
        for position in positions:
            # Once per bundle: a study selected by one Resources entry must not write one line
            # per instance (50 million of them) for the launcher to read back.
            if position not in self._matched_seen:
                self._matched_seen.add(position)
                yield pvalue.TaggedOutput(
                    MATCHED_TAG, GlobalWindows.windowed_value(position) if windowed else position
                )

    def _emit(self, audit: dict[str, Any], crosswalk: dict[str, Any] | None, *, windowed: bool) -> Iterator[Any]:
        self._counters[audit["status"]].inc()
        if audit["reason"]:
            Metrics.counter(_METRICS_NAMESPACE, f"reason_{audit['reason']}").inc()
        self._bytes_in.update(int(audit["bytes_in"] or 0))
        if self._progress is not None:
            self._progress.add(audit["status"])
        # finish_bundle must say which window its outputs belong to: the global one, as
        # everything read from ExpandInput.
        wrap = GlobalWindows.windowed_value if windowed else (lambda value: value)
        yield wrap(audit)
        if crosswalk is not None:
            yield pvalue.TaggedOutput(CROSSWALK_TAG, wrap(crosswalk))

    def finish_bundle(self) -> Iterator[Any]:
        if self._pool is not None:
            yield from self._collect(self._pool.take(id(self), all_of_them=True), windowed=True)
        pending = self._pending
        while pending:
            future, _ = pending.popleft()
            yield from self._emit(*future.result(), windowed=True)
        self._pending_bytes = 0
        if self._progress is not None:
            self._progress.flush()

    def teardown(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._progress is not None:
            self._progress.flush()
        if self._live:
            self._live = False
            _count_live_fns(-1)


_LIVE_LOCK = threading.Lock()
_LIVE = {"fns": 0, "saved": None}


def _count_live_fns(delta: int) -> None:
    """Lower the GIL switch interval while exactly one DeidentifyFn is set up in this process.

    Its writer thread needs the GIL back after each hash or I/O call, and a CPU-bound main
    thread lets go of it only every switch interval (5 ms by default): the writer fell behind
    and the overlap bought nothing (measured: 416 vs 398 files/s without the thread; with
    0.2 ms, 456). With several DoFn threads in one process (multi_threading, Dataflow's 12 per
    SDK process) the main threads compete among themselves and the short interval only adds
    switches (~10% more CPU measured with 4): the interpreter's own interval is restored.
    """
    with _LIVE_LOCK:
        _LIVE["fns"] += delta
        if _LIVE["fns"] == 1:
            if _LIVE["saved"] is None and sys.getswitchinterval() > _SWITCH_INTERVAL:
                _LIVE["saved"] = sys.getswitchinterval()
                sys.setswitchinterval(_SWITCH_INTERVAL)
        elif _LIVE["saved"] is not None:
            sys.setswitchinterval(_LIVE["saved"])
            _LIVE["saved"] = None


def _in_global_window(value: Any) -> Any:
    """An output yielded by ``process`` as ``finish_bundle`` must yield it."""
    if isinstance(value, pvalue.TaggedOutput):
        return pvalue.TaggedOutput(value.tag, _in_global_window(value.value))
    return GlobalWindows.windowed_value(value)


class DeidentifyOutputs(NamedTuple):
    audit: beam.PCollection  # audit_row dicts, one per input file
    crosswalk: beam.PCollection  # crosswalk_row dicts, one per written file (empty without --crosswalk)
    matched: beam.PCollection  # int positions of Resources entries that named an input (with repeats)


class ExpandInput(beam.PTransform):
    """INPUT strings -> ``(path, size)`` per file, redistributed so every worker gets files.

    The reshuffle moves only (path, size) pairs: without it the whole listing would stay in
    the one bundle that read the single INPUT element, i.e. on one worker. A ``gs://`` INPUT's
    first-level prefixes are spread the same way and listed in parallel (``ListPrefixFn``).
    """

    def __init__(self, fan_out: bool = False, spread: bool = True) -> None:
        super().__init__()
        self._fan_out = fan_out
        self._spread = spread

    @classmethod
    def of(cls, input_uri: str, *, spread: bool = True) -> ExpandInput:
        """Fan out (a stage more) only where it pays: a ``gs://`` INPUT. ``spread=False``
        (a local INPUT read by a local run whose worker pool does the work): no reshuffle, the
        listing streams into the DoFn that feeds the pool, instead of being held whole in the
        runner's memory first (measured: ~0.25 KB per file, 481 -> 408 MB peak on 300,000 files)."""
        fan_out = input_uri.startswith("gs://")
        return cls(fan_out=fan_out, spread=spread or fan_out)

    def expand(self, pcoll: beam.PCollection[str]) -> beam.PCollection[tuple[str, int]]:
        if not self._fan_out:
            files = pcoll | "MatchFiles" >> beam.ParDo(ExpandInputFn(fan_out=False))
            return files | "SpreadFiles" >> beam.Reshuffle() if self._spread else files
        listed = pcoll | "MatchFiles" >> beam.ParDo(ExpandInputFn()).with_outputs(PREFIX_TAG, main="files")
        deeper = (
            listed[PREFIX_TAG]
            | "SpreadPrefixes" >> beam.Reshuffle()
            | "ListPrefixes" >> beam.ParDo(ListPrefixFn())
        )
        return (listed.files, deeper) | "AllFiles" >> beam.Flatten() | "SpreadFiles" >> beam.Reshuffle()


class DeidentifyInstances(beam.PTransform):
    """``(path, size)`` -> ``DeidentifyOutputs``; see :func:`process_file`."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        self._cfg = cfg

    def expand(self, pcoll: beam.PCollection[tuple[str, int]]) -> DeidentifyOutputs:
        results = pcoll | "Deidentify" >> beam.ParDo(DeidentifyFn(self._cfg)).with_outputs(
            CROSSWALK_TAG, MATCHED_TAG, main=AUDIT_TAG
        )
        return DeidentifyOutputs(results[AUDIT_TAG], results[CROSSWALK_TAG], results[MATCHED_TAG])

