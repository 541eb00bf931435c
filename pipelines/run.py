"""Pipeline construction and execution: INPUT -> de-identified files + Parquet audit + summary.

``build(pipeline, input_uri, cfg, audit_root, crosswalk_root)`` wires the graph::

    Create([INPUT]) | ExpandInput (match + reshuffle (path, size))
                    | DeidentifyInstances ──audit──> WriteRowsToParquet(<audit>/audit-<run_id>-*.parquet)
                                          └crosswalk─> WriteRowsToParquet(<crosswalk>/crosswalk-<run_id>-*.parquet)

No GroupByKey: UIDs derive from the key, so every file is processed alone. ``execute`` runs
it, then reads this run's audit back, writes ``<audit>/summary.json`` (and
``summary-<run_id>.json``) and removes the run's temporary folder.

Local runs use Beam's DirectRunner with its Prism attempt switched off (``LocalDirectRunner``):
Beam 2.77's ``DirectRunner`` name maps to ``SwitchingDirectRunner``, which first tries to
download and run Prism; offline that fails and falls back, online it would silently run on a
different engine. Naming ``--runner DirectRunner`` therefore selects the same local runner.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, TextIO

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, SetupOptions, StandardOptions
from apache_beam.runners.direct.direct_runner import SwitchingDirectRunner
from apache_beam.transforms.window import GlobalWindows

from pipelines.summary import (  # noqa: F401 - re-exported
    EXIT_OK,
    EXIT_SOME_FAILED,
    SUMMARY_COLUMNS,
    SUMMARY_MAX_RESOURCES,
    AuditTally,
    exit_code,
    summarize,
    write_summary,
    write_text,
    write_whole,
)
from schemas.audit import AUDIT_SCHEMA, CROSSWALK_SCHEMA, FAILED, SKIPPED, WRITTEN
from transforms.errors import RequestError
from transforms.files import remove_sink_temporaries, run_tmp_dir  # noqa: F401 - remove_sink_temporaries re-exported for split/merge
from transforms.beam import (
    _METRICS_NAMESPACE,
    failed_row,
    lost_file_matches,
    remove_local_tmp,
    DeidentifyInstances,
    ExpandInput,
    RunConfig,
    is_local,
    read_progress,
)

_LOCAL_RUNNER_NAMES = ("DirectRunner", "SwitchingDirectRunner")


class LocalDirectRunner(SwitchingDirectRunner):
    """Beam's DirectRunner (FnApiRunner engine) without the attempt to run on Prism first.

    ``SwitchingDirectRunner`` skips Prism for interactive pipelines; declaring ours
    interactive has no other effect in Beam 2.77 (a test pins that the FnApiRunner runs).
    """

    def __init__(self) -> None:
        super().__init__()
        self.is_interactive()


class UnknownOptions(RequestError):
    """Command-line arguments that neither dicom-deid nor any Beam option class knows."""


class InvalidOptions(RequestError):
    """Beam refused the pipeline options (e.g. Dataflow's project or temp_location checks)."""


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    """Beam options from the pass-through arguments; the runner defaults to DirectRunner.

    Raises:
        UnknownOptions: an argument no Beam option class accepts (Beam itself would only log
            "Discarding unparseable args" and go on).
    """
    options = PipelineOptions(beam_args)
    discarded: list[str] = []

    class _Catch(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if "Discarding unparseable args" in record.getMessage():
                arg = record.args[0] if isinstance(record.args, tuple) and record.args else record.getMessage()
                discarded.append(" ".join(map(str, arg)) if isinstance(arg, (list, tuple)) else str(arg))
                return False
            return True

    beam_logger = logging.getLogger("apache_beam.options.pipeline_options")
    catcher = _Catch()
    saved_level = beam_logger.level
    beam_logger.setLevel(logging.WARNING)
    beam_logger.addFilter(catcher)
    usage = io.StringIO()
    try:
        # A value Beam's own parser rejects (``--direct_running_mode nonsense``) makes argparse
        # print the usage of every Beam option (~130 lines) and exit: keep its one error line.
        with contextlib.redirect_stderr(usage):
            options.get_all_options()
    except SystemExit:
        errors = [line for line in usage.getvalue().splitlines() if ": error: " in line]
        detail = errors[-1].split(": error: ", 1)[1] if errors else "invalid Beam pipeline option"
        raise UnknownOptions(f"Beam option: {detail}") from None
    finally:
        beam_logger.removeFilter(catcher)
        beam_logger.setLevel(saved_level)
    if discarded:
        raise UnknownOptions(f"unknown option(s): {discarded[0]} (not a dicom-deid option nor a Beam pipeline option)")
    standard = options.view_as(StandardOptions)
    if isinstance(standard.runner, str) and not standard.runner.strip():
        # ``--runner "$RUNNER"`` with the variable unset: not the default (found by a review)
        raise UnknownOptions("--runner is empty: give a runner (DirectRunner, DataflowRunner, ...; "
                             "an unset shell variable?), or leave --runner out for the DirectRunner")
    standard.runner = canonical_runner(standard.runner) if standard.runner else "DirectRunner"
    if isinstance(standard.runner, str) and "." not in standard.runner and (
            standard.runner.lower() not in _KNOWN_RUNNERS):
        # Beam refuses it too, but only after the checks that take an unknown runner for a
        # remote one ("give the key as gs://"): a typo deserves its own line (found by a review).
        raise UnknownOptions(f"--runner {standard.runner!r}: not a Beam runner (known: "
                             f"{', '.join(sorted(StandardOptions.KNOWN_RUNNER_NAMES))}, or a runner class's "
                             "qualified name)")
    return options


def _known_runners() -> dict[str, str]:
    """Every short runner name Beam's ``create_runner`` takes, by its lower-case spelling: the
    public list and its (private) map, which also holds experimental ones."""
    from apache_beam.runners import runner as beam_runner

    names = [*StandardOptions.KNOWN_RUNNER_NAMES,
             *(path.rsplit(".", 1)[-1] for path in getattr(beam_runner, "_RUNNER_MAP", {}).values())]
    return {name.lower(): name for name in names}


_KNOWN_RUNNERS = _known_runners()


def canonical_runner(name: str) -> str:
    """``--runner`` as Beam resolves it (``create_runner``): any case, "Runner" optional
    (``direct``, ``dataflow``), or a Beam runner's qualified class name; so that the command's
    checks (local or remote, where the key may go) see the runner Beam will start. Any other
    name as given: :func:`pipeline_options` refuses a short one, and takes another module's
    qualified class name for a remote runner."""
    if not isinstance(name, str):
        return name
    lower = name.lower()
    known = _KNOWN_RUNNERS.get(lower) or _KNOWN_RUNNERS.get(lower + "runner")
    if known:
        return known
    module, _, cls = name.rpartition(".")
    if module.startswith("apache_beam.runners.") and cls in StandardOptions.KNOWN_RUNNER_NAMES:
        return cls
    return name


def make_pipeline(options: PipelineOptions) -> beam.Pipeline:
    """A Pipeline on the chosen runner (``LocalDirectRunner`` for the DirectRunner names).

    Raises:
        InvalidOptions: Beam's own option validation failed (one line, no traceback).
    """
    runner_name = options.view_as(StandardOptions).runner
    try:
        if runner_name in _LOCAL_RUNNER_NAMES:
            return beam.Pipeline(runner=LocalDirectRunner(), options=options)
        return beam.Pipeline(options=options)
    except ValueError as exc:
        text = " ".join(str(exc).split())
        raise InvalidOptions(f"Beam options: {text}") from None


def check_options(options: PipelineOptions) -> None:
    """Beam's own validation of ``options`` (a Dataflow project id, region, ...), as
    :func:`make_pipeline` runs it, so that a command refuses them before it reads anything.

    Raises:
        InvalidOptions: one line, no traceback.
    """
    # Values Beam takes here and fails on mid-run (an IndexError in its runner, an ImportError
    # when it pickles the first function), with OUTPUT already claimed.
    workers = options.view_as(DirectOptions).direct_num_workers
    if workers is not None and workers < 0:
        raise InvalidOptions(f"Beam options: --direct_num_workers must be 0 (all cores) or more, got {workers}")
    library = options.view_as(SetupOptions).pickle_library
    if library == "dill" and importlib.util.find_spec("dill") is None:
        raise InvalidOptions("Beam options: --pickle_library dill: the dill package is not installed "
                             "(pip install dill, or leave the option out)")
    pipeline = make_pipeline(options)
    shutil.rmtree(pipeline.local_tempdir, ignore_errors=True)  # made by Pipeline(), removed by run()


def run_and_wait(pipeline: beam.Pipeline, options: PipelineOptions, progress: TextIO | None = None) -> Any:
    """Run ``pipeline`` (made by :func:`make_pipeline`) to completion; its result (metrics).

    Beam skips its test round trip through the runner API (to_runner_api + from_runner_api of
    the whole graph, ~0.3 s) for the DirectRunner in batch, recognising it by class name; our
    LocalDirectRunner subclass would defeat that check, so say it explicitly.

    ``progress``: a stream for the progress line of a job that runs on other machines (the
    local runners are done when ``run`` returns and count in a folder: ``ProgressPrinter``).
    """
    test_runner_api: bool | str = "AUTO"
    if isinstance(pipeline.runner, LocalDirectRunner) and not options.view_as(StandardOptions).streaming:
        test_runner_api = False
    result = pipeline.run(test_runner_api=test_runner_api)
    try:
        wait_for(result, progress)
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C while a remote job runs (the local runners are done when run() returns):
        # cancel it, or it would go on unwatched, its summary never made (and a split or
        # merge pass 2 would lose the plan its workers load, removed on the way out).
        try:
            result.cancel()
        except Exception:  # noqa: BLE001 - already finished, or the service unreachable
            pass
        raise
    return result


def audit_prefix(audit_root: str, run_id: str) -> str:
    return FileSystems.join(audit_root, f"audit-{run_id}")


def crosswalk_prefix(crosswalk_root: str, run_id: str) -> str:
    return FileSystems.join(crosswalk_root, f"crosswalk-{run_id}")


def matched_prefix(audit_root: str, run_id: str) -> str:
    # Hidden (leading dot): Parquet readers of the audit folder skip it; removed after the run.
    return FileSystems.join(audit_root, f".matched-{run_id}")


def read_matched(audit_root: str, run_id: str) -> set[int]:
    """Positions written by WriteMatches; the files are deleted once read."""
    paths = [m.path for m in FileSystems.match([matched_prefix(audit_root, run_id) + "-*.txt"])[0].metadata_list]
    found: set[int] = set()
    for path in paths:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            found.update(int(line) for line in f.read().decode("ascii").split())
    if paths:
        FileSystems.delete(paths)
    return found


class RowsToArrow(beam.DoFn):
    """Row dicts -> ``pyarrow.Table`` s for ``WriteToParquetBatched``: the conversion
    ``WriteToParquet`` makes for bounded input (record batches of ``batch_rows`` rows, one table
    per bundle or per ``table_bytes``), with pyarrow's own converter. Beam's appends every
    value column by column in Python (~20 us per audit row, against ~7 us). ``table_bytes``
    bounds what each instance holds (Dataflow runs a dozen per process; ~16 MB is ~50,000 rows,
    one Parquet row group)."""

    def __init__(self, schema: pa.Schema, batch_rows: int = 1000, table_bytes: int = 16 << 20) -> None:
        self._schema = schema
        self._batch_rows = batch_rows
        self._table_bytes = table_bytes
        self._rows: list[Mapping[str, Any]] = []
        self._batches: list[pa.RecordBatch] = []
        self._bytes = 0

    def start_bundle(self) -> None:
        self._rows, self._batches, self._bytes = [], [], 0

    def process(self, row: Mapping[str, Any]) -> Iterable[pa.Table]:
        self._rows.append(row)
        if len(self._rows) >= self._batch_rows:
            self._flush_rows()
            if self._bytes >= self._table_bytes:
                yield self._table()

    def finish_bundle(self) -> Iterable[Any]:
        self._flush_rows()
        if self._batches:
            yield GlobalWindows.windowed_value_at_end_of_window(self._table())

    def _flush_rows(self) -> None:
        if self._rows:
            batch = pa.RecordBatch.from_pylist(self._rows, schema=self._schema)
            self._rows = []
            self._batches.append(batch)
            self._bytes += batch.nbytes

    def _table(self) -> pa.Table:
        table = pa.Table.from_batches(self._batches, schema=self._schema)
        self._batches, self._bytes = [], 0
        return table


class WriteRowsToParquet(beam.PTransform):
    """``beam.io.WriteToParquet`` for row dicts in the global window (this pipeline's case):
    the same sink and file names, with :class:`RowsToArrow` as the converter."""

    def __init__(self, file_path_prefix: str, schema: pa.Schema, file_name_suffix: str = ".parquet") -> None:
        super().__init__()
        self._prefix = file_path_prefix
        self._schema = schema
        self._suffix = file_name_suffix

    def expand(self, pcoll: beam.PCollection) -> Any:
        return (
            pcoll
            | "ToArrow" >> beam.ParDo(RowsToArrow(self._schema))
            | "Write" >> beam.io.WriteToParquetBatched(self._prefix, self._schema, file_name_suffix=self._suffix)
        )


def build(
    pipeline: beam.Pipeline,
    input_uri: str,
    cfg: RunConfig,
    audit_root: str,
    crosswalk_root: str | None = None,
    *,
    spread: bool = True,
) -> None:
    """Add the de-identification graph to ``pipeline`` (no I/O happens here). ``spread=False``
    when a :class:`transforms.workers.LocalPool` does the work (see ``ExpandInput.of``)."""
    files = pipeline | "Input" >> beam.Create([input_uri]) | "ExpandInput" >> ExpandInput.of(input_uri, spread=spread)
    outputs = files | "DeidentifyInstances" >> DeidentifyInstances(cfg)
    outputs.audit | "WriteAudit" >> WriteRowsToParquet(audit_prefix(audit_root, cfg.run_id), AUDIT_SCHEMA)
    if getattr(cfg.plan, "resources", None):
        # A few ints (positions in Resources, never the identifiers): which entries named an input.
        (
            outputs.matched
            | "DistinctMatches" >> beam.Distinct()
            | "FormatMatches" >> beam.Map(str)
            | "WriteMatches" >> beam.io.WriteToText(matched_prefix(audit_root, cfg.run_id), file_name_suffix=".txt")
        )
    if crosswalk_root is not None:
        outputs.crosswalk | "WriteCrosswalk" >> WriteRowsToParquet(crosswalk_prefix(crosswalk_root, cfg.run_id), CROSSWALK_SCHEMA)


# --------------------------------------------------------------------------- reading back


def _shard_paths(prefix: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([prefix + "-*.parquet"])[0].metadata_list)


def _read_shard(path: str, columns: Iterable[str] | None = None) -> pa.Table:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        # ParquetFile, not read_table: the latter sets up pyarrow's dataset machinery (~0.1 s
        # on first use). On the seekable handle: only the footer and the columns asked for are
        # read, not the whole shard.
        return pq.ParquetFile(f).read(columns=None if columns is None else list(columns))


def read_parquet_prefix(prefix: str, schema: pa.Schema) -> pa.Table:
    """All Parquet shards written under ``prefix`` (local or gs://) as one table."""
    tables = [_read_shard(path) for path in _shard_paths(prefix)]
    if not tables:
        return schema.empty_table()
    return pa.concat_tables([t.cast(schema) for t in tables])


def read_audit(audit_root: str, run_id: str) -> pa.Table:
    return read_parquet_prefix(audit_prefix(audit_root, run_id), AUDIT_SCHEMA)


# --------------------------------------------------------------------------- summary


def tally_audit(audit_root: str, run_id: str, resource_statuses: tuple[str, ...] = (WRITTEN,)) -> AuditTally:
    """This run's audit shards, read one at a time and only the summary's columns."""
    tally = AuditTally(resource_statuses)
    for path in _shard_paths(audit_prefix(audit_root, run_id)):
        tally.add_table(_read_shard(path, SUMMARY_COLUMNS))
    return tally


def write_unclaimed(unclaimed: list[Any], cfg: RunConfig, audit_root: str, crosswalk_root: str | None) -> set[int]:
    """Audit (and crosswalk) rows of head-start files the pipeline never claimed: files the
    pool's workers began with (``LocalPool(head_start=...)``) that the pipeline's own listing
    did not yield, because the folder changed in between. They were processed: each gets its
    row, in ``audit-<run_id>-unclaimed.parquet``. Returns their matched ``Resources`` positions.
    """
    if not unclaimed:
        return set()
    from transforms.workers import WorkerLost

    audit_rows, crosswalk_rows, matched = [], [], set()
    for path, size, result in unclaimed:
        if isinstance(result, WorkerLost):
            audit_rows.append(failed_row(path, size, cfg, result, "process"))
            matched.update(lost_file_matches(path, size, cfg))
            continue
        audit, crosswalk, positions = result
        audit_rows.append(audit)
        if crosswalk is not None:
            crosswalk_rows.append(crosswalk)
        matched.update(positions)
    _write_table(audit_prefix(audit_root, cfg.run_id) + "-unclaimed.parquet", audit_rows, AUDIT_SCHEMA)
    if crosswalk_root is not None and crosswalk_rows:
        _write_table(crosswalk_prefix(crosswalk_root, cfg.run_id) + "-unclaimed.parquet", crosswalk_rows, CROSSWALK_SCHEMA)
    return matched


def _write_table(path: str, rows: list[Mapping[str, Any]], schema: pa.Schema) -> None:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    write_whole(path, sink.getvalue())


def cleanup_tmp(output_root: str, run_id: str) -> None:
    """Remove this run's temporary folder (leftovers of killed workers included). A ``gs://``
    OUTPUT has none: each object is one conditional upload (listing it anyway cost a second
    two-minute retry when the endpoint was unreachable, and hid the first error)."""
    if is_local(output_root):
        remove_local_tmp(output_root, run_id)
        return
    if output_root.startswith("gs://"):
        return
    run_tmp = run_tmp_dir(output_root, run_id)
    leftovers = [m.path for m in FileSystems.match([run_tmp + "/**"])[0].metadata_list]
    if leftovers:
        FileSystems.delete(leftovers)


# --------------------------------------------------------------------------- progress


def progress_line(counts: Mapping[str, int], elapsed: float) -> str:
    """``N files: W written, F failed, S skipped[, C copied, M moved], R files/s``."""
    done = sum(counts.values())
    others = "".join(f", {n} {status}" for status, n in sorted(counts.items())
                     if status not in (WRITTEN, FAILED, SKIPPED) and n)  # split/merge: moved, copied
    return (f"{done} files: {counts.get(WRITTEN, 0)} written, {counts.get(FAILED, 0)} failed, "
            f"{counts.get(SKIPPED, 0)} skipped{others}, {done / max(elapsed, 1e-6):.0f} files/s")


#: The file statuses the DoFns count in Beam metrics (namespace ``dicom_deid``).
_STATUS_COUNTERS = frozenset({WRITTEN, FAILED, SKIPPED, "moved", "copied"})
#: Seconds between two progress lines of a job on other machines (each one asks its service).
REMOTE_PROGRESS_SECONDS = 15.0


def job_counts(result: Any) -> dict[str, int] | None:
    """Files per status so far, from the job's metrics (attempted values: the committed ones lag
    until bundles commit); None when the runner cannot say."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(_METRICS_NAMESPACE))["counters"]
    except Exception:  # noqa: BLE001 - a progress line never stops a run
        return None
    counts: dict[str, int] = {}
    for counter in counters:
        name = counter.key.metric.name
        if name in _STATUS_COUNTERS:
            value = counter.attempted if counter.attempted is not None else counter.committed
            counts[name] = counts.get(name, 0) + int(value or 0)
    return counts


def wait_for(result: Any, progress: TextIO | None = None, interval: float = REMOTE_PROGRESS_SECONDS) -> None:
    """Wait until the job ends; with ``progress``, print its progress line there meanwhile
    (``\r``-rewritten, a newline at the end) from the job's own counters."""
    from apache_beam.runners.runner import PipelineState

    state = getattr(result, "state", None)
    if progress is None or state is None or PipelineState.is_terminal(state):
        result.wait_until_finish()
        return
    start, printed = time.monotonic(), False
    try:
        while not PipelineState.is_terminal(result.wait_until_finish(duration=int(interval * 1000))):
            counts = job_counts(result)
            if counts:
                progress.write(f"\r{progress_line(counts, time.monotonic() - start)}   ")
                progress.flush()
                printed = True
        counts = job_counts(result)
        if counts:
            progress.write(f"\r{progress_line(counts, time.monotonic() - start)}   ")
            printed = True
    finally:
        if printed:
            progress.write("\n")
            progress.flush()


class ProgressPrinter:
    """A thread printing ``N files: W written, F failed, S skipped[, C copied, M moved], R files/s``
    on one terminal line (stderr)."""

    def __init__(self, folder: str, stream: TextIO | None = None, interval: float = 1.0) -> None:
        self._folder = folder
        self._stream = stream if stream is not None else sys.stderr
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dicom-deid-progress", daemon=True)
        self._start = time.monotonic()
        self._printed = False

    def __enter__(self) -> ProgressPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._print()
        if self._printed:
            self._stream.write("\n")
            self._stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._print()

    def _print(self) -> None:
        counts = read_progress(self._folder)
        if not sum(counts.values()) and not self._printed:
            return
        self._stream.write(f"\r{progress_line(counts, time.monotonic() - self._start)}   ")
        self._stream.flush()
        self._printed = True


@dataclass(frozen=True)
class Outcome:
    summary: dict[str, Any]
    exit_code: int


def execute(
    options: PipelineOptions,
    input_uri: str,
    cfg: RunConfig,
    audit_root: str,
    crosswalk_root: str | None = None,
    *,
    reproducible: bool,
    extra_summary: Mapping[str, Any] | None = None,
    progress: bool = False,
    pool: Any = None,
    remote_progress: TextIO | None = None,
) -> Outcome:
    """Build, run and wait for the pipeline; then summarise this run's audit.

    ``pool``: the run's :class:`transforms.workers.LocalPool`, if the caller started one; it is
    closed (its workers done with their files) before the temporary folder goes.
    """
    pipeline = make_pipeline(options)
    build(pipeline, input_uri, cfg, audit_root, crosswalk_root, spread=pool is None)
    unclaimed: list[Any] = []
    stopped = False
    try:
        if progress and cfg.progress_dir:
            with ProgressPrinter(cfg.progress_dir):
                run_and_wait(pipeline, options)
        else:
            run_and_wait(pipeline, options, remote_progress)
    except BaseException:
        stopped = True
        for root in (audit_root, crosswalk_root):
            remove_sink_temporaries(root, cfg.run_id)
        raise
    finally:
        try:
            if pool is not None:
                # A stopped run (Ctrl-C, a failure) writes no more rows: its workers get a few
                # seconds for the file in hand, not the minute a finishing run waits for them.
                from transforms.workers import STOPPED_RUN_GRACE

                unclaimed = pool.close(grace=STOPPED_RUN_GRACE if stopped else None)
        finally:
            cleanup_tmp(cfg.output_root, cfg.run_id)
    unclaimed_matches = write_unclaimed(unclaimed, cfg, audit_root, crosswalk_root)
    # Shard by shard, six columns, counted by Arrow: a launcher's memory must not grow with
    # a 50-million-row audit.
    tally = tally_audit(audit_root, cfg.run_id)
    extra = dict(extra_summary or {})
    resources = getattr(cfg.plan, "resources", None) or ()
    if resources:
        matched = read_matched(audit_root, cfg.run_id) | unclaimed_matches
        extra["ResourcesNotFound"] = [i for i in range(len(resources)) if i not in matched]
    summary = summarize(tally, cfg=cfg, reproducible=reproducible, extra=extra)
    write_summary(audit_root, cfg.run_id, summary)
    return Outcome(summary, exit_code(summary))
