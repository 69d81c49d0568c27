"""Several outputs of different scales: each is scored on its own, and the worst chosen one decides."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwt_onnx import quantize_with_report
from qwt_onnx.api import Score
from qwt_onnx.errors import InputError
from qwt_onnx.numerics import metrics
from qwt_onnx.numerics.metrics import sqnr_db_per_output
from qwt_onnx.report import format_summary
from qwt_onnx.runtime import session
from tests import graphs


def _two_scales() -> onnx.ModelProto:
    """The test ResNet with a second output: its pooled features times 1000, which would swamp
    the logits in an SQNR pooled over outputs."""
    model = graphs.resnet()
    model.graph.initializer.append(numpy_helper.from_array(np.array(1000.0, np.float32), "thousand"))
    model.graph.node.append(helper.make_node("Mul", ["/flatten_out", "thousand"], ["features"]))
    model.graph.output.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 32]))
    onnx.checker.check_model(model)
    return model


def test_each_output_has_its_own_sqnr_and_a_silent_one_none():
    reference = {"big": np.full(100, 1000.0), "small": np.linspace(-1, 1, 100), "zero": np.zeros(100), "ids": np.arange(100)}
    test = {"big": reference["big"] + 1.0, "small": reference["small"] + 0.1, "zero": np.ones(100), "ids": np.arange(100)}
    scores = sqnr_db_per_output(reference, test)
    assert set(scores) == {"big", "small"}
    assert scores["big"] == pytest.approx(60.0, abs=1e-3)
    assert scores["small"] == pytest.approx(10 * np.log10(np.sum(reference["small"] ** 2) / 1.0), abs=1e-3)
    assert Score(scores).db == scores["small"]
    assert Score(scores, ("big",)).db == scores["big"]


def test_a_score_keeps_each_samples_energies_and_pools_them_as_sqnr_does():
    rng = np.random.default_rng(0)
    reference = {"logits": rng.normal(size=(40, 10)), "boxes": 100 * rng.normal(size=(40, 4, 2))}
    test = {k: v + rng.normal(scale=0.1, size=v.shape) for k, v in reference.items()}
    score = metrics.score(reference, test, ("logits",))
    pooled = sqnr_db_per_output(reference, test)
    assert score.outputs_db == pytest.approx(pooled, abs=1e-4) and score.db == score.outputs_db["logits"]
    assert score.energies["boxes"].noise.shape == (40,)
    assert score.energies["boxes"].noise[3] == pytest.approx(np.sum((reference["boxes"][3] - test["boxes"][3]) ** 2), rel=1e-3)  # in float32


def _noisy(reference: dict, scale: np.ndarray, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {k: v + scale[:, None] * rng.normal(size=v.shape) for k, v in reference.items()}


def test_the_gain_interval_is_narrow_for_a_gain_on_every_sample_and_wide_for_one_carried_by_few():
    rng = np.random.default_rng(1)
    reference = {"y": rng.normal(size=(100, 50))}
    even = np.full(100, 0.1)
    old = metrics.score(reference, _noisy(reference, even, 2))
    # half the error on every sample: a 3 dB gain, the same whichever samples are drawn
    everywhere = metrics.score(reference, _noisy(reference, even / np.sqrt(2), 3))
    low, high = metrics.gain_interval(everywhere, old)
    assert 2.5 < low < everywhere.db - old.db < high < 3.5

    # a few samples near a decision boundary carry most of the error and decide the gain alone
    heavy = even.copy()
    heavy[:3] = 3.0
    old = metrics.score(reference, _noisy(reference, heavy, 4))
    fewer = heavy.copy()
    fewer[0] = 0.1  # one of them fixed: a gain that hangs on whether that sample is drawn
    new = metrics.score(reference, _noisy(reference, fewer, 5))
    low, high = metrics.gain_interval(new, old)
    assert new.db > old.db and low < 0.5 < high and high - low > 2.0
    assert metrics.gain_interval(Score({"y": new.db}), old) is None  # no per-sample energies, no interval


def test_the_worst_output_decides_and_the_report_lists_each_measured_on_held_out_samples():
    model = _two_scales()
    calib = graphs.samples(model, 60, seed=1)
    written, report = quantize_with_report(model, calib, qwt=False, progress=False)
    assert set(report.output_sqnr_ptq_db) == {"logits", "features"}
    assert report.sqnr_ptq_db == min(report.output_sqnr_ptq_db.values())
    # an oracle: onnxruntime on the held-out samples (every fifth), the written model against FP32
    heldout = {k: v[4::5] for k, v in calib.items()}
    names = ["logits", "features"]
    reference = dict(zip(names, session(model).run(names, heldout)))
    measured = sqnr_db_per_output(reference, dict(zip(names, session(written).run(names, heldout))))
    for name in names:
        assert report.output_sqnr_ptq_db[name] == pytest.approx(measured[name], abs=1e-3)

    _, chosen = quantize_with_report(model, calib, qwt=False, outputs="logits", progress=False)
    assert chosen.outputs == ["logits"] and chosen.sqnr_ptq_db == chosen.output_sqnr_ptq_db["logits"]
    assert set(chosen.output_sqnr_ptq_db) == {"logits", "features"}
    summary = format_summary(chosen, "two-scales.onnx")
    assert "per output (the worst of logits decides): PTQ logits" in summary and "features" in summary


def test_an_unknown_output_is_named_with_the_valid_ones():
    model = _two_scales()
    with pytest.raises(InputError, match=r"no float output 'scores'; choose from logits, features"):
        quantize_with_report(model, graphs.samples(model, 20, seed=1), outputs="scores", progress=False)
