"""QwT-v2's layer folds: each quantized weighted op's output scaled and shifted per channel, in its weights."""

import collections

import onnx_ir as ir
import pytest
from onnx import numpy_helper

from qwt_onnx.analysis import blocks as blk
from qwt_onnx.analysis import capture
from qwt_onnx.api import quantize_with_report
from qwt_onnx.graph import query as g
from qwt_onnx.qwt import MIN_QWT_GAIN_DB
from qwt_onnx.report import format_summary
from tests import graphs


def test_every_weighted_op_is_a_layer_of_its_own_in_graph_order():
    model = ir.serde.deserialize_model(graphs.resnet(size=8))
    weighted = [n for n in model.graph if n.op_type in ("Conv", "MatMul", "Gemm")]
    layers = blk.weighted_layers(model)
    assert [(b.input, b.output) for b in layers] == [(n.inputs[0].name, n.outputs[0].name) for n in weighted]
    assert all(b.layer for b in layers) and not any(b.layer for b in blk.find_blocks(model))


def test_a_layer_is_compared_before_the_quantizer_of_its_output_and_a_block_after_its_dequantizer():
    # A fold can mend what the quantizer rounds and clips only in what it is given: compared after
    # the DequantizeLinear, a clipped output pulls every fold towards scaling the channel up
    model = graphs.resnet(size=8)
    q, _ = quantize_with_report(model, graphs.samples(model, 20, 0), qwt=False, residuals="int8", progress=False)
    q, fp = ir.serde.deserialize_model(q), ir.serde.deserialize_model(model)
    quantized = next(b for b in blk.weighted_layers(fp) if g.quantized_only_view(g.values_by_name(q.graph)[b.output]))
    as_block = blk.Block(quantized.name, quantized.input, quantized.output, True)
    plans, _ = capture._plan(fp, q, [quantized, as_block], ["image"], True, None, affine=True, whole_error=True)
    assert plans[0].output_in_q == quantized.output
    assert plans[1].output_in_q != quantized.output and g.dequantizer(g.values_by_name(q.graph)[plans[1].output_in_q])


def _op_types(model):
    return collections.Counter(n.op_type for n in model.graph.node)


def _int8_weights(model):
    """The int8 weight tensors (not their zero points, which a fold may give one per channel), as bytes."""
    arrays = (numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == 3)  # int8
    return sorted(a.tobytes() for a in arrays if a.ndim > 1)


@pytest.mark.slow
def test_affine_compensation_folds_into_the_ptq_graphs_scales_and_biases_and_tracks_fp32_closer():
    model = graphs.resnet(size=16)
    calib = graphs.samples(model, 320, 0)
    options = dict(progress=False, **graphs.SYSTEMATIC_ERROR)
    ptq, _ = quantize_with_report(model, calib, qwt=False, **options)
    folded, report = quantize_with_report(model, calib, compensation="affine", **options)
    assert report.layer_folds_written and 0 < report.layer_folds <= report.layer_fold_layers == 9, report.warnings
    assert report.sqnr_layer_folds_db > report.sqnr_ptq_db and report.layer_folds_gain_db > 0
    # judged on samples neither the folds nor the choice of the PTQ model saw: all past the 64 fitted, at most 256
    assert report.layer_fold_judged_samples == 256 and "on the 256 samples past those" in format_summary(report, "resnet.onnx")
    assert not report.blocks and not report.qwt_applied and report.added_parameters == 0
    assert _op_types(folded) == _op_types(ptq)
    assert _int8_weights(folded) == _int8_weights(ptq)


@pytest.mark.slow
def test_branch_compensation_folds_no_layer():
    model = graphs.resnet(size=16)
    _, report = quantize_with_report(model, graphs.samples(model, 120, 0), compensation="branch", progress=False)
    assert report.layer_fold_layers == 0 and not report.layer_folds_written


@pytest.mark.slow
def test_auto_fits_the_branches_on_the_layer_folds_and_writes_them_where_they_gain_over_the_folds(monkeypatch):
    model = graphs.transformer()
    calib = graphs.samples(model, 160, seed=1)
    options = dict(calib_method="entropy", min_gain=0.0, progress=False, **graphs.SYSTEMATIC_ERROR)
    folded, folds_only = quantize_with_report(model, calib, compensation="affine", **options)
    written, report = quantize_with_report(model, calib, **options)
    assert report.layer_folds_written and report.sqnr_layer_folds_db == folds_only.sqnr_layer_folds_db
    # fitted to what the folds leave, and measured against them
    assert report.qwt_applied and report.qwt_on_layer_folds, report.warnings
    assert report.sqnr_qwt_db - report.sqnr_layer_folds_db >= MIN_QWT_GAIN_DB
    low, high = report.qwt_gain_interval_db
    assert 0 < low < report.sqnr_qwt_db - report.sqnr_layer_folds_db < high
    added = _op_types(written) - _op_types(folded)
    assert added and added == collections.Counter(n.op_type for n in written.graph.node if n.name.startswith("qwt/"))
    summary = format_summary(report, "m.onnx")
    assert f"-> with layer folds {report.sqnr_layer_folds_db:.2f} dB -> QwT" in summary and "over the layer folds" in summary
    assert "wrote the QwT model (its branches on the PTQ model with layer folds)" in summary
    # a gain the branches do not pay for: the folded model is written
    monkeypatch.setattr("qwt_onnx.qwt.MIN_QWT_GAIN_DB", report.sqnr_qwt_db - report.sqnr_layer_folds_db + 0.5)
    written, report = quantize_with_report(model, calib, **options)
    assert not report.qwt_applied and report.layer_folds_written
    assert any(w.endswith("writing the PTQ model with layer folds") for w in report.warnings), report.warnings
    assert written.SerializeToString() == folded.SerializeToString()
