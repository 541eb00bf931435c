"""Dataflow: the split/merge passes build with DataflowRunner options, without network.

The same approach as ``tests/test_pipeline_dataflow.py`` (its options and proto helpers are
reused): nothing is submitted; each pass's graph is checked through its portable proto (what
Dataflow receives), and the DoFns are unpickled from it. With the ``[gcp]`` extra installed, a
``--dry_run`` of both passes goes through DataflowRunner.run_pipeline up to the job
description (skipped otherwise).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pydicom
import pytest
from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    SetupOptions,
    StandardOptions,
)
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2

from pipelines import cli
from pipelines import run as pipeline_run
from pipelines import splitmerge as psm
from tests.pipeline_support import KEY, SECRET
from tests.test_pipeline_dataflow import DATAFLOW_ARGS, REPO, _dofns
from tests.test_split_synthetic import (
    CT_SERIES,
    MR_SERIES,
    STUDY_A,
    STUDY_B,
    write_reference_studies,
)
from transforms import splitmerge as sm
from transforms import splitmerge_files as smf

INPUT = "gs://deid-in/archive"
OUTPUT = "gs://deid-out/split"
AUDIT = "gs://deid-out/split-audit"
CROSSWALK = "gs://deid-keys/crosswalk"
RUN_ID = "run-1"
PLAN_URI = f"{OUTPUT}/{psm.TMP_DIR_NAME}/{RUN_ID}/plan.pickle"
INDEX_PREFIX = f"{OUTPUT}/{psm.TMP_DIR_NAME}/{RUN_ID}/index"
SPLIT = sm.parse_split(STUDY_A, {"Series": [CT_SERIES]})
MERGE = sm.parse_merge(STUDY_B, {"Resources": [MR_SERIES]})


def _pipeline(args=DATAFLOW_ARGS):
    options = pipeline_run.pipeline_options(list(args))
    return options, pipeline_run.make_pipeline(options)


def _index_pass(selector: smf.IndexSelector):
    options, pipeline = _pipeline()
    psm.build_index_pass(pipeline, INPUT, selector, 1 << 30, INDEX_PREFIX)
    return options, pipeline


def _apply_pass(cfg: smf.ApplyConfig):
    options, pipeline = _pipeline()
    psm.build_apply_pass(pipeline, INPUT, cfg, AUDIT, CROSSWALK)
    return options, pipeline


def _config(**overrides) -> smf.ApplyConfig:
    fields = {"plan_uri": PLAN_URI, "output_root": OUTPUT, "run_id": RUN_ID, "key_id": KEY.key_id, "copy_unselected": True, "crosswalk": True}
    fields.update(overrides)
    return smf.ApplyConfig(**fields)


def _top(proto: beam_runner_api_pb2.Pipeline) -> set[str]:
    (root,) = proto.root_transform_ids
    return {proto.components.transforms[t].unique_name for t in proto.components.transforms[root].subtransforms}


def _shuffles(proto: beam_runner_api_pb2.Pipeline) -> list[str]:
    return sorted(
        t.unique_name for t in proto.components.transforms.values() if t.spec.urn == common_urns.primitives.GROUP_BY_KEY.urn
    )


def test_options_parse_for_dataflow():
    options, _ = _index_pass(smf.IndexSelector.for_split(SPLIT))
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    gcp = options.view_as(GoogleCloudOptions)
    assert (gcp.project, gcp.region, gcp.temp_location) == ("deid-test-project", "europe-west1", "gs://deid-temp-bucket/tmp")
    setup = options.view_as(SetupOptions)
    assert (setup.setup_file, setup.sdk_location) == (str(REPO / "pyproject.toml"), "container")


def test_split_index_pass_filters_without_grouping():
    selector = smf.IndexSelector.for_split(SPLIT)
    _, pipeline = _index_pass(selector)
    proto = pipeline.to_runner_api()
    assert _top(proto) == {"Input", "ExpandInput", "BuildStudyIndex", "EncodeIndex", "WriteIndex"}
    names = {t.unique_name for t in proto.components.transforms.values()}
    assert {"ExpandInput/MatchFiles", "ExpandInput/SpreadFiles", "BuildStudyIndex/ReadHeaders"} <= names
    assert not any(n.startswith("BuildStudyIndex/") for n in _shuffles(proto))
    assert "BuildStudyIndex/GroupByStudy" not in names
    (fn,) = [f for f in _dofns(proto) if isinstance(f, psm._IndexFn)]
    assert (fn._selector, fn._max_bytes) == (selector, 1 << 30)


def test_merge_index_pass_groups_by_study():
    selector = smf.IndexSelector.for_merge(MERGE)
    _, pipeline = _index_pass(selector)
    proto = pipeline.to_runner_api()
    assert _top(proto) == {"Input", "ExpandInput", "BuildStudyIndex", "EncodeIndex", "WriteIndex"}
    names = {t.unique_name for t in proto.components.transforms.values()}
    assert {"BuildStudyIndex/ReadHeaders", "BuildStudyIndex/KeyByStudy", "BuildStudyIndex/KeepRelevantStudies"} <= names
    gbk = _shuffles(proto)
    # the one shuffle of the merge's own: whole studies for the planner
    assert [n for n in gbk if n.startswith("BuildStudyIndex/")] == ["BuildStudyIndex/GroupByStudy"]
    assert all(n.startswith(("ExpandInput/SpreadFiles/", "ExpandInput/SpreadPrefixes/", "WriteIndex/", "BuildStudyIndex/GroupByStudy")) for n in gbk)
    (fn,) = [f for f in _dofns(proto) if isinstance(f, psm._IndexFn)]
    assert fn._selector == selector and fn._selector.study_tags_for == STUDY_B


@pytest.mark.parametrize(("request_", "moved"), [(SPLIT, 3), (MERGE, 2)], ids=["split", "merge"])
def test_apply_pass_reads_the_plan_from_its_uri(tmp_path: Path, request_, moved: int):
    """The plan (every new UID) stays out of the job description; workers read it by URI."""
    paths = write_reference_studies(tmp_path)
    selector = smf.IndexSelector.for_split(request_) if request_ is SPLIT else smf.IndexSelector.for_merge(request_)
    entries = [sm.index_entry(str(p), pydicom.dcmread(p, stop_before_pixels=True), study_tags_for=selector.study_tags_for)
               for p in paths.values()]  # fmt: skip
    plan = sm.plan_split(entries, request_, KEY) if request_ is SPLIT else sm.plan_merge(entries, request_, KEY)
    _, pipeline = _apply_pass(_config())
    proto = pipeline.to_runner_api()
    assert _top(proto) == {"Input", "ExpandInput", "ApplySplitMerge", "WriteAudit", "WriteCrosswalk"}
    assert "ApplySplitMerge/Apply" in {t.unique_name for t in proto.components.transforms.values()}
    gbk = _shuffles(proto)
    assert gbk and all(n.startswith(("ExpandInput/SpreadFiles/", "ExpandInput/SpreadPrefixes/", "WriteAudit/", "WriteCrosswalk/")) for n in gbk)
    (fn,) = [f for f in _dofns(proto) if isinstance(f, psm._ApplyFn)]
    assert fn._cfg == _config() and fn._plan is None and fn._cfg.progress_dir is None
    serialized = proto.SerializeToString()
    new_uids = [plan.study_uid, *(sop for _, sop in plan.moves.values())]
    assert len(set(new_uids)) == 1 + moved  # CT: 3 images; MR: 2
    assert not any(uid.encode() in serialized for uid in new_uids)
    assert SECRET not in serialized


def test_split_command_refuses_invalid_dataflow_options(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch):
    """Through ``dicom-deid split``: one line, exit 2, nothing written (no network, no job: the
    last summary in gs:// OUTPUT is not even read)."""
    monkeypatch.setattr(cli, "other_key_warning", lambda *_: pytest.fail("read the last summary before refusing"))
    key = tmp_path / "key"
    key.write_bytes(SECRET)
    args = [a if a != "deid-test-project" else "p" for a in DATAFLOW_ARGS]
    code = cli.main(["split", "gs://deid-in/archive", "gs://deid-out/o", "--study", STUDY_A,
                     "--body", json.dumps({"Series": [CT_SERIES]}), "--key-file", str(key), "--quiet", "--progress",
                     *args])  # fmt: skip
    assert code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("dicom-deid: Beam options: Pipeline has validations errors: Invalid Project ID (p)")
    assert err.count("\n") == 1 and "\r" not in err  # --progress: a remote runner gets no progress line
    # The same with local locations is refused before Beam sees the options.
    write_reference_studies(tmp_path / "in")
    out = tmp_path / "out"
    code = cli.main(["split", str(tmp_path / "in"), str(out), "--study", STUDY_A, "--body", json.dumps({"Series": [CT_SERIES]}),
                     "--key-file", str(key), "--quiet", *args])  # fmt: skip
    assert code == cli.EXIT_USAGE
    assert capsys.readouterr().err == (
        "dicom-deid: --runner DataflowRunner runs on other machines, which cannot reach this machine's files: "
        "give INPUT, OUTPUT, --audit as gs:// locations\n")
    assert not out.exists() and not (tmp_path / "out-audit").exists()



@pytest.mark.skipif(
    importlib.util.find_spec("apache_beam.runners.dataflow.internal.apiclient") is None
    or importlib.util.find_spec("google.cloud.dataflow") is None,
    reason="DataflowRunner's job client needs the [gcp] extra",
)
def test_dataflow_dry_run_builds_both_jobs():
    """Both passes through DataflowRunner.run_pipeline up to the job description; nothing is submitted."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("--setup_file with pyproject.toml needs the 'build' package")
    for options, pipeline in (_index_pass(smf.IndexSelector.for_merge(MERGE)), _apply_pass(_config())):
        result = pipeline.run()
        assert str(result.state) == "DONE"
        assert result.job.proto.name.startswith("beamapp-")
        (env,) = pipeline.runner.proto_pipeline.components.environments.values()
        staged = {beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(d.role_payload).staged_name for d in env.dependencies}
        assert "workflow.tar.gz" in staged
