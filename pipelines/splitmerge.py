"""``dicom-deid split`` and ``dicom-deid merge``: two Beam passes around the pure planner.

::

    pass 1  Create([INPUT]) | ExpandInput | ReadHeaders (stop_before_pixels) -> IndexEntry
            split: keep the entries of the --study study (no shuffle)
            merge: GroupByKey(Orthanc study id) and keep the studies that hold the target or
                   a requested resource (series/instance ids need their whole study)
            | WriteToText(<work folder>/index-*.jsonl); the work folder (see work_folder) is a
              private local temporary folder, or --temp_location, never OUTPUT unless neither exists
    driver  read the index, transforms.splitmerge.plan_split/plan_merge (refusals end the run
            here, before any output), write the plan next to the index
    pass 2  Create([INPUT]) | ExpandInput | ApplySplitMerge (plan loaded in setup())
            -> one audit row per input -> WriteRowsToParquet(<AUDIT>/audit-<run_id>-*.parquet)

The per-file work (a file's index entry, the plan file, moving or copying one file into its
audit row) is plain Python in :mod:`transforms.splitmerge_files`; this module wraps it in DoFns
and runs the driver.

Pass 2 needs no grouping: the plan already holds every new UID. The key stays on the driver;
workers only read the plan file (which can be large: it lists every moved instance, so it
is not embedded in the pipeline description, whose size Dataflow limits).

Audit statuses of an input: ``moved`` (re-parented and written under its new UIDs; with
``KeepSource: true`` the unchanged original is also written under its own UIDs, which the
row's ``detail`` says), ``copied`` (not selected, written unchanged: ``--copy-unselected``),
``skipped`` (not selected; reason ``not_selected``), ``failed`` (reason code). Copied files
keep their original identifiers, so their output paths and UID columns show them.

``--progress`` (default: stderr is a terminal and the runner is local) shows the anonymize
command's line during pass 2: pass-2 workers count every input's final status into a local
folder (``transforms.beam.ProgressFile``) and ``pipelines.run.ProgressPrinter`` sums them.
The line shows ``written``, ``failed`` and ``skipped`` and, when there are any, ``copied`` and
``moved``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import EXIT_OK, EXIT_SOME_FAILED
from pipelines.summary import AuditTally
from schemas.audit import FAILED, MOVED, STATUSES
from transforms import splitmerge as sm
from transforms import splitmerge_files as smf
from transforms.beam import ProgressFile, quiet_pydicom_warnings
from transforms.errors import RequestError
from transforms.files import (  # noqa: F401 - TMP_DIR_NAME re-exported
    TMP_DIR_NAME,
    is_local,
    make_local_work_folder,
    remove_local_work_folder,
    run_tmp_dir,
)

CROSSWALK_TAG = "crosswalk"
AUDIT_TAG = "audit"
_METRICS_NAMESPACE = "dicom_deid_splitmerge"
#: The index pass's counter of files over --max-bytes, which it does not read.
_NOT_INDEXED_TOO_LARGE = "not_indexed_too_large"


def _too_large_files(result: Any) -> int:
    """Files the index pass did not read because they are over --max-bytes (0 if the runner
    cannot say)."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        counters = result.metrics().query(
            MetricsFilter().with_namespace(_METRICS_NAMESPACE).with_name(_NOT_INDEXED_TOO_LARGE))["counters"]
    except Exception:  # noqa: BLE001 - only a hint in an error message
        return 0
    return sum(int((c.committed if c.committed is not None else c.attempted) or 0) for c in counters)


# --------------------------------------------------------------------------- pass 1: the index


class _IndexFn(beam.DoFn):
    def __init__(self, selector: smf.IndexSelector, max_bytes: int) -> None:
        self._selector = selector
        self._max_bytes = max_bytes
        self._indexed = Metrics.counter(_METRICS_NAMESPACE, "indexed")
        self._too_large = Metrics.counter(_METRICS_NAMESPACE, _NOT_INDEXED_TOO_LARGE)

    def setup(self) -> None:
        quiet_pydicom_warnings()

    def process(self, element: tuple[str, int]) -> Iterator[sm.IndexEntry]:
        path, size = element
        if size > self._max_bytes:
            self._too_large.inc()  # not read (pass 2 gives it a too_large row if it moves)
        entry = smf.index_file(path, size, self._selector, self._max_bytes)
        if entry is not None:
            self._indexed.inc()
            yield entry


def _relevant_study(group: tuple[str, Iterable[sm.IndexEntry]], selector: smf.IndexSelector) -> Iterator[sm.IndexEntry]:
    _, entries = group
    entries = list(entries)
    if any(selector.matches(e) for e in entries):
        yield from entries


class BuildStudyIndex(beam.PTransform):
    """``(path, size)`` -> the :class:`IndexEntry` records the planner needs.

    A split needs only the entries of its study: they are filtered file by file. A merge's
    resources may name a series or an instance, yet the plan needs the whole study (to know
    what stays behind), so entries are grouped by Orthanc study id and whole studies kept.
    """

    def __init__(self, selector: smf.IndexSelector, max_bytes: int) -> None:
        super().__init__()
        self._selector = selector
        self._max_bytes = max_bytes

    def expand(self, pcoll: beam.PCollection[tuple[str, int]]) -> beam.PCollection[sm.IndexEntry]:
        entries = pcoll | "ReadHeaders" >> beam.ParDo(_IndexFn(self._selector, self._max_bytes))
        if not self._selector.grouped:
            return entries
        return (
            entries
            | "KeyByStudy" >> beam.Map(lambda e: (e.study, e))
            | "GroupByStudy" >> beam.GroupByKey()
            | "KeepRelevantStudies" >> beam.FlatMap(_relevant_study, self._selector)
        )


# --------------------------------------------------------------------------- pass 2: apply


class _ApplyFn(beam.DoFn):
    """``(path, size)`` -> one audit row; crosswalk rows on ``CROSSWALK_TAG``."""

    def __init__(self, cfg: smf.ApplyConfig) -> None:
        self._cfg = cfg
        self._plan: sm.Plan | None = None
        self._progress: ProgressFile | None = None
        self._counters = {s: Metrics.counter(_METRICS_NAMESPACE, s) for s in STATUSES}
        self._budget: Any = None

    def setup(self) -> None:
        from transforms.beam import process_budget

        quiet_pydicom_warnings()
        self._plan = smf.load_plan(self._cfg.plan_uri)
        self._budget = process_budget(self._cfg.memory_budget)
        if self._cfg.progress_dir and os.path.isdir(self._cfg.progress_dir):
            self._progress = ProgressFile(self._cfg.progress_dir)

    def process(self, element: tuple[str, int]) -> Iterator[Any]:
        assert self._plan is not None
        path, size = element
        held = int(size) if 0 < size <= self._cfg.max_bytes else 0  # as DeidentifyFn
        if held:
            self._budget.acquire(held)
        try:
            audit, crosswalk = smf.process_instance(path, size, self._plan, self._cfg)
        finally:
            if held:
                self._budget.release(held)
        self._counters[audit["status"]].inc()
        if self._progress is not None:
            self._progress.add(audit["status"])
        yield audit
        if crosswalk is not None:
            yield pvalue.TaggedOutput(CROSSWALK_TAG, crosswalk)

    def finish_bundle(self) -> None:
        if self._progress is not None:
            self._progress.flush()

    def teardown(self) -> None:
        if self._progress is not None:
            self._progress.flush()


class ApplyOutputs(NamedTuple):
    audit: beam.PCollection  # audit_row dicts, one per input file
    crosswalk: beam.PCollection  # crosswalk_row dicts, one per moved file (empty without --crosswalk)


class ApplySplitMerge(beam.PTransform):
    """``(path, size)`` -> ``ApplyOutputs(audit rows, crosswalk rows)``; see :func:`process_instance`."""

    def __init__(self, cfg: smf.ApplyConfig) -> None:
        super().__init__()
        self._cfg = cfg

    def expand(self, pcoll: beam.PCollection[tuple[str, int]]) -> ApplyOutputs:
        results = pcoll | "Apply" >> beam.ParDo(_ApplyFn(self._cfg)).with_outputs(CROSSWALK_TAG, main=AUDIT_TAG)
        return ApplyOutputs(results[AUDIT_TAG], results[CROSSWALK_TAG])


# --------------------------------------------------------------------------- driver


def work_folder(options: PipelineOptions, output_root: str, run_id: str) -> str:
    """Where the study index and the plan go: they hold original identifiers, so never under
    OUTPUT when avoidable (a killed run would leave them in the folder that gets shared). A
    local runner: a private folder in the system's temporary directory; another runner: the
    pipeline's ``--temp_location``; OUTPUT's temporary folder only as the last resort."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    from pipelines.cli import LOCAL_RUNNERS, runner_name

    if runner_name(options) in LOCAL_RUNNERS:
        return make_local_work_folder(run_id)  # locked: a killed run's folder is swept later
    temp_location = options.view_as(GoogleCloudOptions).temp_location
    if temp_location:
        return FileSystems.join(temp_location, f"dicom-deid-{run_id}")
    return run_tmp_dir(output_root, run_id)


def remove_work_folder(folder: str, output_root: str, run_id: str) -> None:
    """Remove :func:`work_folder`'s folder (OUTPUT's temporary folder is ``cleanup_tmp``'s)."""
    if folder == run_tmp_dir(output_root, run_id) and not output_root.startswith("gs://"):
        return  # cleanup_tmp's (it skips gs://, where nothing else uses that folder)
    if is_local(folder):
        remove_local_work_folder(folder)
        return
    try:
        leftovers = [m.path for m in FileSystems.match([folder + "/**"])[0].metadata_list]
        if leftovers:
            FileSystems.delete(leftovers)
    except Exception:  # noqa: BLE001 - a temporary folder that cannot be listed: left to its bucket's lifecycle
        pass


def build_index_pass(
    pipeline: beam.Pipeline, input_uri: str, selector: smf.IndexSelector, max_bytes: int, prefix: str
) -> None:
    from transforms.beam import ExpandInput

    (
        pipeline
        | "Input" >> beam.Create([input_uri])
        | "ExpandInput" >> ExpandInput.of(input_uri)
        | "BuildStudyIndex" >> BuildStudyIndex(selector, max_bytes)
        | "EncodeIndex" >> beam.Map(smf.encode_entry)
        | "WriteIndex" >> beam.io.WriteToText(prefix, file_name_suffix=".jsonl")
    )


def read_index(prefix: str) -> list[sm.IndexEntry]:
    entries: list[sm.IndexEntry] = []
    for result in FileSystems.match([prefix + "*.jsonl"]):
        for meta in sorted(result.metadata_list, key=lambda m: m.path):
            with FileSystems.open(meta.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                for line in io.TextIOWrapper(f, encoding="utf-8"):
                    if line.strip():
                        entries.append(smf.decode_entry(line))
    return entries


def build_apply_pass(
    pipeline: beam.Pipeline, input_uri: str, cfg: smf.ApplyConfig, audit_root: str, crosswalk_root: str | None
) -> None:
    from pipelines.run import WriteRowsToParquet, audit_prefix, crosswalk_prefix
    from schemas.audit import AUDIT_SCHEMA, CROSSWALK_SCHEMA
    from transforms.beam import ExpandInput

    files = pipeline | "Input" >> beam.Create([input_uri]) | "ExpandInput" >> ExpandInput.of(input_uri)
    outputs = files | "ApplySplitMerge" >> ApplySplitMerge(cfg)
    outputs.audit | "WriteAudit" >> WriteRowsToParquet(audit_prefix(audit_root, cfg.run_id), AUDIT_SCHEMA)
    if crosswalk_root is not None:
        outputs.crosswalk | "WriteCrosswalk" >> WriteRowsToParquet(
            crosswalk_prefix(crosswalk_root, cfg.run_id), CROSSWALK_SCHEMA
        )


def summarize(rows: Iterable[Mapping[str, Any]] | AuditTally, plan: sm.Plan, *, key_id: str, run_id: str, output: str,
              reproducible: bool, copy_unselected: bool, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The run's answer, shaped like Orthanc's split/merge job content (behaviour §11, §12).

    ``InstancesCount`` counts the inputs moved or failed, ``FailedInstancesCount`` the failed
    ones (within it, as in Orthanc's jobs; the anonymize summary counts written + failed alike:
    the plan's count would include instances that then failed, and leave out failed inputs that
    are no instance at all); ``Resources`` the new instances, series, study and patient (moved rows; at
    most ``SUMMARY_MAX_RESOURCES`` per level, ``ResourcesTruncated`` names the levels that had
    more).
    """
    tally = rows if isinstance(rows, AuditTally) else AuditTally((MOVED,)).add_rows(rows)
    statuses, reasons = tally.statuses, tally.reasons
    resources, truncated = tally.resources()
    summary: dict[str, Any] = {
        "Description": f"dicom-deid {plan.operation}",
        "InstancesCount": statuses[MOVED] + statuses[FAILED],
        "FailedInstancesCount": statuses[FAILED],
        "TargetStudy": plan.study_id,
        "TargetStudyUID": plan.study_uid,
        "Resources": resources,
        "ResourcesTruncated": truncated,
        "InputFiles": sum(statuses.values()),
        "Statuses": {s: statuses[s] for s in STATUSES},
        "Reasons": dict(sorted(reasons.items())),
        "KeepSource": plan.keep_source,
        "CopyUnselected": copy_unselected,
        "KeyId": key_id,
        "Reproducible": reproducible,
        "RunId": run_id,
        "Output": output,
    }
    if not reproducible:
        summary["Warning"] = (
            "no --key-file and no DICOM_DEID_KEY: a random key was used, so the new UIDs cannot be "
            "reproduced by a later run"
        )
    if extra:
        summary.update(extra)
    return summary


@dataclasses.dataclass(frozen=True)
class Outcome:
    plan: sm.Plan
    summary: dict[str, Any]
    exit_code: int


def execute(
    options: PipelineOptions,
    input_uri: str,
    request: sm.SplitRequest | sm.MergeRequest,
    key: Any,
    *,
    output_root: str,
    audit_root: str,
    crosswalk_root: str | None = None,
    run_id: str,
    max_bytes: int = 2 << 30,
    copy_unselected: bool = False,
    extra_summary: Mapping[str, Any] | None = None,
    progress_dir: str | None = None,
    remote_progress: Any = None,
) -> Outcome:
    """Index, plan, apply; then summarise this run's audit.

    With ``progress_dir`` (an existing local folder), pass 2 shows
    :class:`pipelines.run.ProgressPrinter`'s line on stderr; the caller removes the folder.
    With ``remote_progress`` (a stream), pass 2 of a job on other machines shows the same line
    from the job's counters (:func:`pipelines.run.wait_for`).

    Raises:
        RequestError: the request does not fit INPUT (unknown study, empty selection, ...);
            nothing has been written then (the run's temporary folder is removed).
    """
    from pipelines.run import (
        ProgressPrinter,
        cleanup_tmp,
        make_pipeline,
        remove_sink_temporaries,
        run_and_wait,
        tally_audit,
        write_summary,
    )

    created: list[str] = []  # local folders this run creates (OUTPUT and missing parents)
    if is_local(output_root):
        folder = os.path.abspath(output_root)
        while folder and not os.path.exists(folder) and folder != os.path.dirname(folder):
            created.append(folder)
            folder = os.path.dirname(folder)
    tmp = work_folder(options, output_root, run_id)
    # tmp once the index pass wrote there: a remote work folder (--temp_location, a scratch
    # bucket) is not listed after a job that failed to start; OUTPUT's is always cleaned.
    used: list[str] = [tmp] if tmp == run_tmp_dir(output_root, run_id) else []
    try:
        if is_local(output_root):
            from transforms.files import claim_local_tmp

            claim_local_tmp(output_root, run_id, sinks=(audit_root, crosswalk_root))  # sweeps killed runs' leftovers
        if isinstance(request, sm.SplitRequest):
            selector = smf.IndexSelector.for_split(request)
        else:
            selector = smf.IndexSelector.for_merge(request)
        index_prefix = FileSystems.join(tmp, "index")
        pipeline = make_pipeline(options)
        build_index_pass(pipeline, input_uri, selector, max_bytes, index_prefix)
        index_result = run_and_wait(pipeline, options)
        used.append(tmp)  # the index is there now
        entries = read_index(index_prefix)
        try:
            if isinstance(request, sm.SplitRequest):
                plan = sm.plan_split(entries, request, key)
            else:
                plan = sm.plan_merge(entries, request, key)
        except sm.NotInInput as exc:
            # "not in INPUT" may mean "not read": say so rather than blame the selection.
            skipped = _too_large_files(index_result)
            if skipped:
                raise RequestError(
                    f"{exc}; {skipped:,} input file{'s' if skipped > 1 else ''} over --max-bytes "
                    f"({max_bytes:,} bytes) {'were' if skipped > 1 else 'was'} not read: raise --max-bytes "
                    "if what you selected is among them") from None
            raise
        plan_uri = FileSystems.join(tmp, "plan.pickle")
        smf.write_plan(plan_uri, plan)
        cfg = smf.ApplyConfig(
            plan_uri=plan_uri,
            output_root=output_root,
            run_id=run_id,
            key_id=key.key_id,
            max_bytes=max_bytes,
            copy_unselected=copy_unselected,
            crosswalk=crosswalk_root is not None,
            progress_dir=progress_dir,
        )
        pipeline = make_pipeline(options)
        build_apply_pass(pipeline, input_uri, cfg, audit_root, crosswalk_root)
        if progress_dir:
            with ProgressPrinter(progress_dir):
                run_and_wait(pipeline, options)
        else:
            run_and_wait(pipeline, options, remote_progress)
    except RequestError:
        cleanup_tmp(output_root, run_id)
        if used or is_local(tmp):
            remove_work_folder(tmp, output_root, run_id)
        for folder in created:  # deepest first, each only if empty: refused means nothing written
            try:
                os.rmdir(folder)
            except OSError:
                break
        raise
    except BaseException:
        for root in (audit_root, crosswalk_root):
            remove_sink_temporaries(root, run_id)
        raise
    finally:
        cleanup_tmp(output_root, run_id)
        if used or is_local(tmp):
            remove_work_folder(tmp, output_root, run_id)
    summary = summarize(
        tally_audit(audit_root, run_id, (MOVED,)),
        plan,
        key_id=key.key_id,
        run_id=run_id,
        output=output_root,
        reproducible=key.reproducible,
        copy_unselected=copy_unselected,
        extra=extra_summary,
    )
    write_summary(audit_root, run_id, summary)
    return Outcome(plan, summary, EXIT_SOME_FAILED if summary["FailedInstancesCount"] else EXIT_OK)


# --------------------------------------------------------------------------- command line


def parse_request(command: str, study: str, body: Mapping[str, Any]) -> sm.SplitRequest | sm.MergeRequest:
    if command == sm.SPLIT:
        return sm.parse_split(study, body)
    return sm.parse_merge(study, body)


def run_command(args: argparse.Namespace, beam_args: list[str]) -> int:
    """The ``split`` / ``merge`` subcommand (called by ``pipelines.cli.main``)."""
    from pipelines import cli
    from pipelines import run as pipeline_run

    if args.body is None and args.config is None:
        raise cli.UsageError(f"{args.command}: give the request body with --body JSON or --config FILE")
    body, _dictionary = cli.load_request(args.body, args.config)  # no private tags in these modules
    request = parse_request(args.command, args.study, body)
    key, _key_uri = cli.load_key(args.key_file)
    input_uri = cli.normalize_input(args.input)
    output = cli.normalize(args.output)
    if output.lower().endswith(".dcm"):
        raise cli.UsageError(f"{args.command}: OUTPUT must be a folder or gs:// prefix, not a .dcm file")
    where = cli.prepare_locations(args, input_uri, output)
    try:
        options = pipeline_run.pipeline_options(beam_args)
    except pipeline_run.UnknownOptions as exc:
        raise cli.UsageError(str(exc)) from None
    run_id = cli.new_run_id()
    local_runner = cli.prepare_runner(options, args, beam_args, where, run_id)
    pipeline_run.check_options(options)
    if local_runner:
        import tempfile

        if any(c in tempfile.gettempdir() for c in "*?["):
            # The study index is written there by Beam's text sink, which reads the name as a glob.
            raise cli.UsageError(f"{args.command}: the temporary directory {tempfile.gettempdir()!r} holds *, ? or [, "
                                 "which Beam's file sinks read as patterns: set TMPDIR to another folder")
    last = cli.refuse_mixed_release(where, False, args.command)  # (reads gs:// too)
    cli._warn_random_key(key)
    mixed = cli.other_key_warning(where, key.key_id, last)  # after every refusal
    progress_dir = cli.progress_folder(args, local_runner)
    with cli.run_leftovers_removed(output, run_id, progress_dir):
        outcome = execute(
            options,
            input_uri,
            request,
            key,
            output_root=output,
            audit_root=where.audit,
            crosswalk_root=where.crosswalk,
            run_id=run_id,
            max_bytes=args.max_bytes,
            copy_unselected=args.copy_unselected,
            extra_summary=where.summary_extra(),
            progress_dir=progress_dir,
            remote_progress=cli.remote_progress(args, local_runner),
        )
    return cli.report(args, outcome.summary, outcome.exit_code, where.audit, warnings=mixed)


__all__ = [
    "ApplySplitMerge",
    "BuildStudyIndex",
    "execute",
    "run_command",
    "summarize",
]
