"""What QwT's branches cost at run time, measured, and what --max-slowdown keeps of them."""

import numpy as np
import pytest

from qwt_onnx import api, latency, quantize_with_report, qwt
from qwt_onnx.analysis import capture
from qwt_onnx.calibration import CalibrationSet
from qwt_onnx.graph import prepare
from qwt_onnx.latency import RunTimes
from qwt_onnx.layer_folds import LayerFolds
from qwt_onnx.options import Options
from qwt_onnx.report import format_summary
from qwt_onnx.run import Run, Warnings
from tests import graphs

# QwT on its own: the branches of this model's blocks, each fitted to its block's own error
OPTIONS = dict(progress=False, residuals="float", fit_error="own", compensation="auto", min_gain=0.0, **graphs.SYSTEMATIC_ERROR)


def test_the_kernels_of_a_scope_are_a_part_of_each_profiled_run_and_measured_once(monkeypatch):
    model = graphs.resnet()
    feeds = graphs.samples(model, 4, seed=0)
    times = latency.run_times(model, feeds, ["/layer2/", "/nothing/"], runs=3)
    assert times.runs_us.shape == (3,) and np.all(times.scopes_us["/layer2/"] > 0)
    assert np.all(times.scopes_us["/layer2/"] < times.runs_us) and not times.scopes_us["/nothing/"].any()
    assert times.slowdown() > 1.0 and times.slowdown([]) == 1.0
    # measured once: the same model and feeds read their times back, other feeds are measured
    monkeypatch.setattr(latency, "_profiled", lambda *_: pytest.fail("measured again"))
    again = latency.run_times(model, feeds, ["/layer2/", "/nothing/"], runs=3)
    np.testing.assert_array_equal(again.runs_us, times.runs_us)
    with pytest.raises(pytest.fail.Exception, match="measured again"):
        latency.run_times(model, graphs.samples(model, 4, seed=1), ["/layer2/", "/nothing/"], runs=3)


def test_the_slowdown_of_some_scopes_is_over_the_run_without_any():
    spent = np.array([50.0, 100.0, 50.0])
    times = RunTimes(np.array([1100.0, 1200.0, 1100.0]), {"a/": spent, "b/": spent})
    assert times.slowdown() == pytest.approx(1.1) and times.slowdown(["a/"]) == pytest.approx(1.05)


def test_the_run_is_weighed_at_batch_1_and_16_or_at_the_batch_the_model_is_fixed_to():
    fp = api.load_fp32(graphs.resnet())
    calib = CalibrationSet.load(graphs.samples(graphs.resnet(), 24, seed=0), prepare.input_specs(fp), 24)
    assert Run(fp, calib, 16, Options(), Warnings()).latency_batches == [1, 16]
    assert Run(fp, calib.take(8), 16, Options(), Warnings()).latency_batches == [1, 8]  # as many as there are
    fp.meta["fixed_batch"] = 4  # as load_fp32 records a fixed batch it frees
    assert Run(fp, calib, 4, Options(), Warnings()).latency_batches == [4]


@pytest.fixture
def resnet_and_calib(monkeypatch):
    """A model whose blocks keep QwT's branches: auto's layer folds, fitted first, would leave them little."""
    monkeypatch.setattr("qwt_onnx.api.fold_layers", lambda run, model, *_, **__: LayerFolds(None, 0, 0, 0))
    model = graphs.resnet(size=16)
    return model, graphs.samples(model, 160, seed=0)


def _each_branch_adds_3_percent(monkeypatch):
    monkeypatch.setattr(latency, "run_times", lambda model, feeds, scopes, **_: RunTimes(
        np.full(3, 1000.0 + 30.0 * len(scopes)), {s: np.full(3, 30.0) for s in scopes}))


def test_auto_fits_again_with_the_branches_that_remove_the_most_error_per_time_within_max_slowdown(resnet_and_calib, monkeypatch):
    model, calib = resnet_and_calib
    _, everything = quantize_with_report(model, calib, **graphs.ANY_RUN_TIME, **OPTIONS)
    with_branch = [b for b in everything.blocks if b.kept]
    assert len(with_branch) >= 3 and everything.qwt_applied, everything.warnings
    _each_branch_adds_3_percent(monkeypatch)  # within 1.05 one is kept: the one that removes the most of its block's error
    written, report = quantize_with_report(model, calib, max_slowdown=1.05, **OPTIONS)
    best = max(with_branch, key=lambda b: 1.0 - b.error_ratio_heldout)
    assert [b.name for b in report.blocks if b.kept and b.fold_site is None] == [best.name]  # the others: a fold at most
    assert sorted(report.branches_left_out) == sorted(b.name for b in with_branch if b is not best)
    everyone = 1 + 0.03 * len(with_branch)
    assert report.branches_slowdown == {"1": pytest.approx(everyone), "16": pytest.approx(everyone)}
    assert report.kept_branches_slowdown == {"1": pytest.approx(1.03), "16": pytest.approx(1.03)}
    # fitted again without the others, the one kept still gains; they get no branch, and say why
    assert report.qwt_applied and report.sqnr_qwt_db > report.sqnr_ptq_db, report.warnings
    spliced = {n.name.split("/")[1] for n in written.graph.node if n.name.startswith("qwt/")}  # folds add no nodes
    assert spliced == {f"block{[b.name for b in report.blocks].index(best.name)}"}
    assert all("no branch: it would add 3.0% to the run, over --max-slowdown" in b.note
               for b in report.blocks if b.name in report.branches_left_out)
    summary = format_summary(report, "model.onnx")
    left_out = len(with_branch) - 1
    assert f"over --max-slowdown 1.05: {left_out} left out, the others +3.0% at batch 1 and +3.0% at batch 16" in summary


def test_branches_over_max_slowdown_are_left_out_and_branch_keeps_them(resnet_and_calib, monkeypatch):
    model, calib = resnet_and_calib
    _each_branch_adds_3_percent(monkeypatch)
    written, report = quantize_with_report(model, calib, max_slowdown=1.02, **OPTIONS)
    assert report.branches_left_out and not any(b.kept and b.fold_site is None for b in report.blocks)
    assert not any(n.name.startswith("qwt/") and n.op_type in ("Conv", "Add") for n in written.graph.node)
    assert any("--compensation branch keeps them all" in w for w in report.warnings)
    _, forced = quantize_with_report(model, calib, max_slowdown=1.02, **{**OPTIONS, "compensation": "branch"})
    assert forced.qwt_applied and not forced.branches_slowdown and not forced.branches_left_out


def test_max_slowdown_is_judged_on_the_trials_branches_so_all_samples_are_captured_once(resnet_and_calib, monkeypatch):
    model, calib = resnet_and_calib
    _each_branch_adds_3_percent(monkeypatch)
    captured, fit_blocks = [], capture.fit_blocks

    def counted(fp, quantized, blocks, samples, *args, **kwargs):
        captured.append(samples.num_samples)
        return fit_blocks(fp, quantized, blocks, samples, *args, **kwargs)

    monkeypatch.setattr(capture, "fit_blocks", counted)
    _, report = quantize_with_report(model, calib, max_slowdown=1.05, **OPTIONS)
    assert report.branches_left_out and report.qwt_applied, report.warnings
    assert captured == [64, 160]  # the trial, then all samples once: with the branches that fit only
    assert any("over --max-slowdown 1.05: fitting QwT on all samples with the 1 that fit" in w for w in report.warnings)
    summary = format_summary(report, "model.onnx")
    assert "QwT's branches, as fitted on the first 64 samples: +" in summary
    # where a branch of the fit on all samples is larger than the trial's, the fit is timed again and
    # the report keeps what the trial's timing left out
    monkeypatch.setattr(qwt, "_timed_by", lambda *_: False)
    captured.clear()
    _, again = quantize_with_report(model, calib, max_slowdown=1.05, **OPTIONS)
    assert captured == [64, 160] and again.branches_left_out == report.branches_left_out
    line = [x for x in summary.splitlines() if x.startswith("QwT's branches")]
    assert again.branches_slowdown == report.branches_slowdown
    assert [x for x in format_summary(again, "model.onnx").splitlines() if x.startswith("QwT's branches")] == line
