"""Several outputs of different scales: each is scored on its own, and the worst chosen one decides."""

from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes.common import TopologicalSortPass

from qwt_onnx import observe, quantize_with_report
from qwt_onnx.api import load_fp32
from qwt_onnx.calibration import CalibrationSet
from qwt_onnx.errors import InputError
from qwt_onnx.graph import prepare
from qwt_onnx.numerics import metrics
from qwt_onnx.numerics.compensation import Layout
from qwt_onnx.numerics.metrics import Score, sqnr_db_per_output
from qwt_onnx.passes import splice
from qwt_onnx.qwt import MIN_QWT_GAIN_DB, beats, outputs_gaining
from qwt_onnx.report import Report, format_summary
from qwt_onnx.run import Warnings
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


def test_scores_taken_batch_by_batch_are_those_of_all_the_samples_together():
    model = _two_scales()
    calib = graphs.samples(model, 24, 0)
    quantized, _ = quantize_with_report(model, calib, qwt=False, progress=False)
    indices = np.arange(5, 24)
    samples = CalibrationSet.load(calib, prepare.input_specs(load_fp32(model)))
    score, = observe.scores_on(model, [quantized], samples, indices, 4, ("logits",), None)
    outputs = [dict(zip(["logits", "features"], session(m).run(["logits", "features"], {"image": calib["image"][indices]})))
               for m in (model, quantized)]
    whole = metrics.score(*outputs, ("logits",))
    assert score.outputs_db == pytest.approx(whole.outputs_db, abs=1e-4) and score.db == pytest.approx(whole.db, abs=1e-4)
    assert score.energies["features"].noise == pytest.approx(whole.energies["features"].noise, rel=1e-5)


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


def test_qwt_that_lifts_the_worst_output_and_sinks_another_beyond_noise_is_not_written():
    # ddddocr's YOLOX detector: QwT lifted its objectness, the worst part, by 0.5 dB held out and
    # cost its boxes 6 dB, which stayed above the objectness; the worst part alone accepted it
    rng = np.random.default_rng(0)
    reference = {"boxes": rng.normal(size=(100, 40)) * 30.0, "objectness": rng.normal(size=(100, 40))}

    def noisy(boxes: float, objectness: float, seed: int) -> dict[str, np.ndarray]:
        noise = np.random.default_rng(seed)
        return {k: v + s * noise.normal(size=v.shape) for (k, v), s in zip(reference.items(), (boxes, objectness))}

    ptq = metrics.score(reference, noisy(0.3, 0.15, 1))
    qwt = metrics.score(reference, noisy(0.6, 0.13, 2))  # boxes 6 dB worse, still far above the objectness
    assert qwt.db > ptq.db and metrics.gain_interval(qwt, ptq)[0] > 0
    low, high = metrics.output_gain_intervals(qwt, ptq)["boxes"]
    assert -6.7 < low < high < -5.3
    warnings = Warnings()
    run = SimpleNamespace(warnings=warnings, calib=SimpleNamespace(scoring_mask=np.ones(100, bool)))

    def guard(new: metrics.Score) -> bool:
        compensation = SimpleNamespace(score=new, method="minmax")
        candidate = SimpleNamespace(score=ptq, method="minmax", layer_folds=0)
        return beats(run, compensation, candidate, metrics.gain_interval(new, ptq))

    assert not guard(qwt) and "makes boxes worse" in list(warnings)[-1]
    assert guard(metrics.score(reference, noisy(0.3, 0.13, 2)))  # both at least as good: written


def test_qwt_that_lifts_other_outputs_beyond_noise_is_written_though_the_worst_moves_within_noise():
    # mediapipe's hand landmarker: QwT took its presence score 18.5 -> 26.3 dB and its world landmarks
    # 11.7 -> 14.0 dB held out, while its handedness, a sigmoid of one logit, stayed the worst (12.0 -> 12.2)
    rng = np.random.default_rng(0)
    reference = {"handedness": rng.normal(size=(100, 1)), "landmarks": rng.normal(size=(100, 63)) * 50.0}
    heavy = np.where(rng.random((100, 1)) < 0.05, 3.0, 0.2)  # a few samples near the decision carry its error

    errors = heavy * rng.normal(size=(100, 1))
    fixed = errors.copy()
    fixed[np.argmax(np.abs(errors))] /= 2  # QwT halves one sample's handedness error: a gain that hangs on drawing it

    def noisy(handedness: np.ndarray, landmarks: float) -> dict[str, np.ndarray]:
        return {"handedness": reference["handedness"] + handedness,
                "landmarks": reference["landmarks"] * (1 + landmarks * rng.normal(size=(100, 63)))}

    ptq, qwt = metrics.score(reference, noisy(errors, 0.3)), metrics.score(reference, noisy(fixed, 0.1))
    low, high = metrics.gain_interval(qwt, ptq)
    assert qwt.db > ptq.db + MIN_QWT_GAIN_DB and low <= 0 < high
    assert metrics.output_gain_intervals(qwt, ptq)["landmarks"][0] > 5.0
    run = SimpleNamespace(warnings=Warnings(), calib=SimpleNamespace(scoring_mask=np.ones(100, bool)))
    compensation, candidate = SimpleNamespace(score=qwt, method="mse"), SimpleNamespace(score=ptq, method="mse", layer_folds=0)
    assert beats(run, compensation, candidate, (low, high)) and not list(run.warnings)
    assert outputs_gaining(compensation, candidate) == ["landmarks"]
    report = Report(target="ort", method="mse", samples=500, heldout_samples=100, qwt_applied=True, ptq_method="mse",
                    sqnr_ptq_db=ptq.db, sqnr_qwt_db=qwt.db, qwt_gain_interval_db=[low, high], qwt_outputs_gaining=["landmarks"])
    gain = f"+{qwt.db - ptq.db:.2f} dB, 95% interval +0.00 to +{high:.2f} dB; beyond noise on landmarks)"
    assert gain in format_summary(report, "m")
    alone = {"handedness": reference["handedness"]}  # the one output: its noise decides
    one = [metrics.score(alone, {"handedness": noisy(e, 0.0)["handedness"]}) for e in (fixed, errors)]
    assert not beats(run, SimpleNamespace(score=one[0], method="mse"), SimpleNamespace(score=one[1], method="mse", layer_folds=0),
                          metrics.gain_interval(*one))


def test_outputs_exact_in_every_model_are_named_once_in_the_summary():
    # a float LSTM's final states (madmom's beat trackers have twelve) are exact in every model
    states = {f"state_{k}": float("inf") for k in range(4)}
    report = Report(target="ort", method="minmax", samples=100, heldout_samples=20, qwt_applied=True, sqnr_ptq_db=20.0,
                    sqnr_qwt_db=21.3, output_sqnr_ptq_db={"beats": 20.0, **states}, output_sqnr_qwt_db={"beats": 21.3, **states})
    line = next(line for line in format_summary(report, "m").splitlines() if "per output" in line)
    assert line.endswith("PTQ beats 20.0 dB; QwT beats 21.3 dB; exact in every model, no quantized op changing them: state_0, state_1 and 2 more")


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


def _concatenated() -> onnx.ModelProto:
    """The two scales of :func:`_two_scales` in one output, as detectors write boxes and class
    scores: ``joined`` [batch, 10 + 32], the logits first."""
    model = _two_scales()
    model.graph.node.append(helper.make_node("Concat", ["logits", "features"], ["joined"], axis=1))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("joined", TensorProto.FLOAT, ["batch", 42]))
    onnx.checker.check_model(model)
    return model


def test_a_part_of_an_output_decides_and_is_scored_on_its_own():
    model = _concatenated()
    calib = graphs.samples(model, 60, seed=1)
    _, whole = quantize_with_report(model, calib, qwt=False, outputs="joined", progress=False)
    _, default = quantize_with_report(model, calib, qwt=False, progress=False)
    written, part = quantize_with_report(model, calib, qwt=False, outputs="joined[:, :10]", progress=False)
    # by default each input of the Concat is a part (tests/test_parts.py), the logits' the worst
    assert default.output_parts == ["joined[:, 0:10]", "joined[:, 10:42]"]
    assert default.sqnr_ptq_db == pytest.approx(part.sqnr_ptq_db, abs=1e-3)
    assert set(part.output_sqnr_ptq_db) == {"joined", "joined[:, :10]"}
    # the features x 1000 swamp the whole; the logits part alone is worse, and it decides
    assert part.sqnr_ptq_db == part.output_sqnr_ptq_db["joined[:, :10]"] < part.output_sqnr_ptq_db["joined"]
    assert whole.sqnr_ptq_db == whole.output_sqnr_ptq_db["joined"]
    # an oracle: onnxruntime on the held-out samples (every fifth), the logits columns alone
    heldout = {k: v[4::5] for k, v in calib.items()}
    reference, test = session(model).run(None, heldout)[0][:, :10], session(written).run(None, heldout)[0][:, :10]
    assert part.sqnr_ptq_db == pytest.approx(sqnr_db_per_output({"y": reference}, {"y": test})["y"], abs=1e-3)


@pytest.mark.parametrize("label, message", [
    ("joined[4:]", r"must keep every sample: begin its index with ':'"),
    ("joined[:, a:b]", r"no float output 'joined\[:, a:b\]' \(a part's index takes integers and slices"),
    ("joined[:, :, 1]", r"indexes 3 axes of joined, which has 2"),
    ("joined[:, 50:]", r"selects nothing of axis 1 of joined, which has 42"),
])
def test_a_bad_part_is_named_with_the_fix(label, message):
    model = _concatenated()
    with pytest.raises(InputError, match=message):
        quantize_with_report(model, graphs.samples(model, 20, seed=1), outputs=label, progress=False)


def test_parts_are_split_from_a_list_of_outputs_at_commas_outside_brackets():
    from qwt_onnx.options import Options

    assert Options(outputs="output0[:, 4:],states").outputs == ("output0[:, 4:]", "states")
    assert metrics.part_of("output0[:, 4:]") == ("output0", (slice(None), slice(4, None)))
    assert metrics.part_of("y[:, ::2, -1]") == ("y", (slice(None), slice(None, None, 2), -1))


def test_branches_checked_at_the_outputs_are_checked_on_the_chosen_part():
    model = _concatenated()
    calib = graphs.samples(model, 160, seed=1)
    _, report = quantize_with_report(model, calib, calib_method="minmax", min_gain=0.0, check_outputs=True,
                                     outputs="joined[:, :10]", compensation="branch", progress=False,
                                     **graphs.SYSTEMATIC_ERROR)
    checked = [b for b in report.blocks if b.output_gain_db is not None]
    assert checked and all(b.kept == (b.output_gain_db > 0) for b in checked)
    assert report.sqnr_ptq_db == report.output_sqnr_ptq_db["joined[:, :10]"]
    # the kept branches' gains at the part add up to about the written model's (the stream they
    # were checked on does not requantize as the written graph does)
    assert report.qwt_applied
    assert report.sqnr_qwt_db - report.sqnr_ptq_db == pytest.approx(sum(b.output_gain_db for b in checked if b.kept), abs=1.0)


def test_an_output_written_time_major_under_a_wrong_declared_shape_is_scored_on_its_samples():
    # ddddocr's recogniser declares its output [1, seqlen] and writes [T, 1, classes]
    model = graphs.resnet()
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 4, 8], np.int64), "steps_shape"))
    model.graph.node.append(helper.make_node("Reshape", ["/flatten_out", "steps_shape"], ["steps"]))
    model.graph.node.append(helper.make_node("Transpose", ["steps"], ["time_major"], perm=[1, 0, 2]))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("time_major", TensorProto.FLOAT, ["batch", "seqlen"]))
    calib = graphs.samples(model, 40, seed=1)
    written, report = quantize_with_report(model, calib, qwt=False, calib_method="minmax", bias_correction="off", progress=False)
    heldout = {k: v[4::5] for k, v in calib.items()}
    reference, test = (np.moveaxis(session(m).run(None, heldout)[0], 1, 0) for m in (model, written))
    assert report.sqnr_ptq_db == pytest.approx(sqnr_db_per_output({"y": reference}, {"y": test})["y"], abs=1e-3)


def test_a_branch_on_an_output_takes_no_shape_from_its_declaration():
    # ddddocr's recogniser declares its logits [1, seqlen] and writes [T, 1, classes]: the tensors
    # of a low-rank branch added to them took that rank, onnxruntime fused their MatMul and Add
    # into a Gemm of rank-2 inputs, and the written model would not load. A branch's tensors are
    # left for onnxruntime to infer.
    model = graphs.time_major_tagger()
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seqlen"]))
    fp = load_fp32(model)
    classifier = next(node for node in fp.graph if "classifier" in node.name and node.op_type in ("MatMul", "Gemm"))
    rng = np.random.default_rng(0)
    branch = splice.Branch("block0", classifier.inputs[0].name, "logits", rng.standard_normal((16, 4)).astype(np.float32),
                           np.zeros(10, np.float32), Layout(channels_first=False), up=rng.standard_normal((4, 10)).astype(np.float32))
    ir.passes.PassManager([splice.SpliceCompensationPass([branch]), TopologicalSortPass()])(fp)
    made = [v for node in fp.graph if node.name.startswith("qwt/block0/") and node.op_type != "Add" for v in node.outputs]
    assert made and all(v.shape is None for v in made)
    assert session(ir.serde.serialize_model(fp)).run(None, graphs.samples(model, 2, seed=0))[0].shape == (12, 2, 10)


def test_an_output_whose_length_depends_on_the_batch_is_scored_zero_padded():
    # a decoder that runs until every sequence of its batch has ended (SLANet's table decoder, in
    # a Loop) writes as many steps as the batch needs: batches differ, and so may FP32 and INT8
    model = graphs.resnet()
    g = model.graph
    g.initializer.extend([
        numpy_helper.from_array(np.array([-1, 4, 8], np.int64), "steps_shape"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array(1.0, np.float32), "least"),
        numpy_helper.from_array(np.array(4.0, np.float32), "most"),
        numpy_helper.from_array(np.array([0, 0, 0], np.int64), "corner_starts"),
        numpy_helper.from_array(np.array([1, 1, 1], np.int64), "corner_ends"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "corner_axes"),
    ])
    g.node.extend([
        helper.make_node("Reshape", ["/flatten_out", "steps_shape"], ["steps"]),
        helper.make_node("Slice", ["image", "corner_starts", "corner_ends", "corner_axes"], ["corner"]),
        helper.make_node("ReduceMax", ["corner"], ["batch_max"], keepdims=0),
        helper.make_node("Clip", ["batch_max", "least", "most"], ["clipped"]),
        helper.make_node("Ceil", ["clipped"], ["ceiled"]),
        helper.make_node("Cast", ["ceiled"], ["count"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["count", "one"], ["ends"]),
        helper.make_node("Slice", ["steps", "zero", "ends", "one"], ["decoded"]),
    ])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("decoded", TensorProto.FLOAT, ["batch", "steps", 8]))
    calib = graphs.samples(model, 64, seed=1)
    lengths = {session(model).run(None, {"image": calib["image"][i : i + 16]})[0].shape[1] for i in range(0, 64, 16)}
    assert len(lengths) > 1  # the batches differ
    written, report = quantize_with_report(model, calib, qwt=False, calib_method="minmax", progress=False)
    assert np.isfinite(report.sqnr_ptq_db) and report.sqnr_ptq_db > 10
    # steps one side computes and the other does not count as error against zeros
    reference, test = np.ones((2, 3, 4), np.float32), np.ones((2, 2, 4), np.float32)
    assert metrics.sqnr_db({"y": reference}, {"y": test}) == pytest.approx(10 * np.log10(24 / 8))
    assert metrics.score({"y": test}, {"y": reference}).db == pytest.approx(10 * np.log10(16 / 8))
