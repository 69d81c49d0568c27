"""The capture fits each block on the stream the written model really computes."""

import functools

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import TopologicalSortPass

from qwt_onnx import observe, runtime
from qwt_onnx.analysis import blocks, capture
from qwt_onnx.analysis.placement import place
from qwt_onnx.calibration import CalibrationSet
from qwt_onnx.graph import prepare
from qwt_onnx.graph import query as g
from qwt_onnx.numerics import metrics
from qwt_onnx.numerics import quantization as qm
from qwt_onnx.numerics.compensation import Layout
from qwt_onnx.numerics.ranges import compute_range
from qwt_onnx.passes import qdq, splice
from qwt_onnx.runtime import Runner, samples_axes
from tests import graphs


def _min_max_quantized(model):
    """The prepared FP32 model, our Q/DQ model of it with min-max ranges, and 24 samples."""
    fp = prepare.prepare(ir.serde.deserialize_model(model))
    calib = CalibrationSet(graphs.samples(model, 24, seed=1), prepare.input_specs(fp))
    seen = observe.observe(prepare.to_proto(fp), place(fp.graph, "ort").observed_names, calib, 8)
    q = fp.clone()
    qdq.InsertQdqPass({n: compute_range(o, "minmax") for n, o in seen.ranges.items()}, "ort")(q)
    return fp, q, calib


def _spliced(q, results):
    """``q`` with the kept blocks' branches spliced in (a copy), and those branches."""
    branches = [
        splice.Branch(f"block{k}", r.branch_input, r.block.output, r.result.fit.weight, r.result.fit.bias, r.layout,
                      int8_scale=r.int8_scale, input_range=r.input_range, output_range=r.output_range)
        for k, r in enumerate(results) if r.kept
    ]
    written = q.clone()
    ir.passes.PassManager([splice.SpliceCompensationPass(branches), TopologicalSortPass()])(written)
    return written, branches


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("build, units", [(graphs.resnet, False), (graphs.mobilenet, False), (graphs.valid_cnn, False),
                                          (graphs.keras_cnn, False), (graphs.detector_neck, True),
                                          (graphs.two_scale_detector, False),
                                          (functools.partial(graphs.two_scale_detector, pan=True), True)],
                         ids=["resnet", "mobilenet", "valid_cnn", "keras", "neck-units", "heads", "pan-units"])
def test_each_block_input_in_the_stream_is_what_the_written_model_computes(build, units, int8, monkeypatch):
    # with units, a later unit's input is led from several compensated outputs, not the last one only
    fp, q, calib = _min_max_quantized(build())
    found = blocks.find_blocks(fp, units=units)
    entered = {}
    record = capture._Stream._enter
    monkeypatch.setattr(
        capture._Stream, "_enter", lambda s, i, name, live: (entered.setdefault(name, {}).update({i: live[name]}), record(s, i, name, live))
    )
    # an int8 branch's quantizers and stored weights are in the stream as in the written graph
    # where branches are checked at the outputs (here by a check that keeps every branch)
    check = _output_check(fp, calib)
    monkeypatch.setattr(capture, "_checked_at_outputs", lambda stream, result, *_: result)
    results = capture.fit_blocks(fp, q, found, calib, 8, exact_boundaries=True,
                                 branch_options=capture.BranchOptions(int8=int8), check=check)
    assert sum(r.kept for r in results) >= 2
    assert any(r.plan.requantized is not None or r.plan.quantized_output is not None for r in results)

    written, branches = _spliced(q, results)
    inputs = [b.input for b in found[1:]]
    for value in written.graph.outputs[:]:
        written.graph.outputs.remove(value)
    # A block input read only through Q/DQ is compensated after its DequantizeLinear and
    # quantized again there: its readers see the stream value through that quantizer.
    q_values = g.values_by_name(q.graph)
    views = {name: g.quantized_only_view(q_values[name]) for name in inputs}
    read = {name: view.name if view is not None else name for name, view in views.items()}
    by_name = {v.name: v for node in written.graph for v in node.outputs}
    written.graph.outputs.extend(by_name[read[name]] for name in inputs)
    run = Runner(prepare.to_proto(written))
    for i, batch in enumerate(calib.batches(8, capture.stream_order(calib, checked=True))):
        actual = run(batch.feeds)
        for name, view in views.items():
            expected = entered[name][i]
            if view is not None:
                params = g.quantizer_params(g.requantizer(view))
                expected = qm.dequantize(qm.quantize(expected, params), params)
            difference = np.abs(expected - actual[read[name]])
            # onnxruntime and numpy sum in different orders: values on a rounding boundary flip one
            # step, and later blocks carry the flips on (before the requantization was modelled, a
            # sixth to most of the elements differed)
            assert np.mean(difference > 1e-5) < 0.05, name


def test_a_unit_whose_input_joins_several_earlier_outputs_is_led_from_their_compensated_values():
    fp, q, calib = _min_max_quantized(graphs.detector_neck())
    found = blocks.find_blocks(fp, units=True)
    _, models = capture._plan(fp, q, found, ["image"], True, None)
    names = [b.name for b in found]
    neck, coarse_head = models[names.index("/neck/conv")], names.index("/head.1/conv")
    # the neck's input joins the upsampled coarse map and the fine one, both stream values (taken
    # as context they would come from the FP32 model)
    assert set(neck.lead_in.inputs) == {"/stem/act_out", "/down/act_out"} and not neck.lead_in.context
    assert found[coarse_head].input == "/down/act_out" and models[coarse_head].lead_in is None
    # each stream value is kept until the last lead-in or input that reads it, and no longer (the
    # lead-in of block j runs as the stream advances past block j - 1)
    kept = [set(m.kept_after) for m in models]
    assert "/stem/act_out" in kept[0] and "/stem/act_out" not in kept[1]
    assert "/down/act_out" in kept[1] & kept[2] and "/down/act_out" not in kept[3]


@pytest.mark.parametrize("build, units", [(graphs.resnet, False), (graphs.detector_neck, True),
                                          (functools.partial(graphs.two_scale_detector, pan=True), True)],
                         ids=["resnet", "neck-units", "pan-units"])
def test_the_whole_error_is_measured_against_the_fp32_models_own_activations(build, units, monkeypatch):
    # the FP32 stream is led through the FP32 graph block by block, as the quantized one is
    # through the quantized graph: a unit's input joins several earlier outputs
    fp, q, calib = _min_max_quantized(build())
    found = blocks.find_blocks(fp, units=units)
    compared = {}
    outputs_of = capture._Stream.fp32_outputs

    def recorded(stream, models, block):
        fp32 = outputs_of(stream, models, block)
        return lambda i, *args: compared.setdefault((block.output, i), fp32(i, *args))

    monkeypatch.setattr(capture._Stream, "fp32_outputs", recorded)
    capture.fit_blocks(fp, q, found, calib, 8, exact_boundaries=True, branch_options=capture.BranchOptions(whole_error=True))
    outputs = [b.output for b in found]
    run = Runner(runtime.with_outputs(prepare.to_proto(fp), outputs))
    for i, batch in enumerate(calib.batches(8, capture.stream_order(calib, checked=False))):
        own = run(batch.feeds)
        for name in outputs:
            np.testing.assert_allclose(compared[(name, i)], own[name], rtol=1e-5, atol=1e-5)


def test_a_branch_fitted_to_the_whole_error_removes_what_earlier_blocks_left():
    # only the second dense layer gets a branch; the first computes a tenth too much (a scale
    # off, as a badly clipped layer would), which reaches the second layer's output: a branch
    # fitted to the whole error there undoes it, one fitted to the layer's own error cannot
    fp, q, calib = _min_max_quantized(graphs.tensordot_mlp(dims=(8, 16, 16)))
    scale = g.values_by_name(q.graph)["/dense0/weight_scale"]
    scale.const_value = ir.tensor(scale.const_value.numpy() * 1.1)
    second = blocks.find_blocks(fp)[1:]
    check = _output_check(fp, calib)
    sqnr = {}
    for whole in (False, True):
        results = capture.fit_blocks(fp, q, second, calib, 8, exact_boundaries=True,
                                     branch_options=capture.BranchOptions(int8=False, whole_error=whole))
        assert results[0].kept
        sqnr[whole] = _heldout_sqnr(_spliced(q, results)[0], check, calib)
    assert sqnr[True] > sqnr[False] + 1.0


def test_tf2onnx_dense_layers_get_token_branches():
    fp, q, calib = _min_max_quantized(graphs.tensordot_mlp())
    results = capture.fit_blocks(fp, q, blocks.find_blocks(fp), calib, 8, exact_boundaries=True)
    assert [r.layout for r in results] == [Layout(channels_first=False)] * 2 and not any(r.skipped.startswith("no") for r in results)


@pytest.mark.parametrize("same_width", [False, True])
def test_branches_of_unpadded_blocks_crop_the_quantized_input_and_run_in_integer_kernels(tmp_path, same_width):
    import onnx
    import onnxruntime as ort

    fp, q, calib = _min_max_quantized(graphs.valid_cnn(same_width=same_width))
    results = capture.fit_blocks(fp, q, blocks.find_blocks(fp), calib, 8, exact_boundaries=True)
    cropped = [r for r in results if r.kept and r.layout.cropping]
    assert len(cropped) >= 2 and not any(r.skipped for r in results)
    if same_width:  # cropped in height only
        assert all(r.layout.crops[1] == (0, 0) != r.layout.crops[0] for r in cropped)
    written, branches = _spliced(q, results)
    crops = [n for n in written.graph if n.op_type == "Slice" and n.name.startswith("qwt/")]
    assert len(crops) == len(cropped)
    assert all(n.inputs[0].producer().op_type == "QuantizeLinear" for n in crops)  # the quantized tensor is cropped

    def kernels(model):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(prepare.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]

    ptq, compensated = kernels(q), kernels(written)
    assert "Conv" not in compensated  # every branch convolution fused, its cropped input included
    assert compensated.count("QLinearConv") == ptq.count("QLinearConv") + sum(b.layout.channels_first for b in branches)


def _output_check(reference_model, calib):
    """What the capture checks branches against: ``reference_model``'s outputs on the scoring samples."""
    proto = prepare.to_proto(reference_model)
    return capture.OutputCheck(observe.heldout_outputs(proto, calib, 8, "reference"), calib.scoring_mask, samples_axes(proto)[1])


def _heldout_sqnr(model, check, calib):
    outputs = observe.heldout_outputs(prepare.to_proto(model), calib, 8, "scoring")
    return min(metrics.sqnr_db_per_output(check.reference, outputs).values())


@pytest.mark.parametrize("batch_size", [8, 5])  # 5 does not divide the scoring samples
def test_a_held_out_score_taken_batch_by_batch_equals_the_score_of_the_joined_outputs(batch_size):
    fp, q, calib = _min_max_quantized(graphs.resnet())
    reference = observe.heldout_outputs(prepare.to_proto(fp), calib, 8, "reference")
    joined = metrics.score(reference, observe.heldout_outputs(prepare.to_proto(q), calib, 8, "scoring"))
    streamed = observe.heldout_score(prepare.to_proto(q), calib, batch_size, reference, (), "scoring")
    assert streamed.outputs_db == pytest.approx(joined.outputs_db, rel=1e-12) and np.isfinite(streamed.db)
    for name, energies in joined.energies.items():
        np.testing.assert_allclose(streamed.energies[name].noise, energies.noise, rtol=1e-12)


def test_branches_checked_at_the_outputs_add_up_to_the_written_models_gain():
    fp, q, calib = _min_max_quantized(graphs.resnet())
    check = _output_check(fp, calib)
    results = capture.fit_blocks(fp, q, blocks.find_blocks(fp), calib, 8, exact_boundaries=True,
                                 branch_options=capture.BranchOptions(int8=False), check=check)
    checked = [r for r in results if r.output_gain_db is not None]
    assert len(checked) >= 2 and all(r.output_gain_db > 0 for r in checked if r.kept)
    assert all(r.skipped.startswith("dropped") for r in checked if not r.kept)
    written, _ = _spliced(q, results)
    # each gain was measured on the stream with the branches kept before it: they add up to what
    # the written model gains at its output, but for the values onnxruntime rounds to the other
    # quantization step than numpy (a percent of the elements; at this toy's 37 dB they weigh)
    gained = _heldout_sqnr(written, check, calib) - _heldout_sqnr(q, check, calib)
    assert gained > 0 and gained == pytest.approx(sum(r.output_gain_db for r in results if r.kept), abs=0.5)


def test_a_branch_that_moves_the_outputs_away_from_the_reference_is_dropped():
    fp, q, calib = _min_max_quantized(graphs.resnet())
    unchecked = capture.fit_blocks(fp, q, blocks.find_blocks(fp), calib, 8, exact_boundaries=True)
    assert any(r.kept for r in unchecked)
    # against the quantized model's own outputs, whatever a branch changes makes them worse
    results = capture.fit_blocks(fp, q, blocks.find_blocks(fp), calib, 8, exact_boundaries=True, check=_output_check(q, calib))
    assert not any(r.kept for r in results)
    assert all(r.skipped.startswith("dropped") for r, before in zip(results, unchecked) if before.kept)
