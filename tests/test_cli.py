import errno
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

from qwt_onnx import Report
from qwt_onnx import __main__ as cli
from qwt_onnx.analysis import capture
from tests import graphs


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qwt_onnx", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    model = graphs.resnet()
    onnx.save(model, folder / "model.onnx")
    np.savez(folder / "calib.npz", **graphs.samples(model, 48, seed=1))
    data = model.SerializeToString()
    (folder / "truncated.onnx").write_bytes(data[: len(data) // 2])
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].input[0] = "no_such_tensor"  # onnx.checker: input not produced by any node
    (folder / "broken.onnx").write_bytes(broken.SerializeToString())
    newer = onnx.ModelProto()  # tf2onnx 1.17 writes HardSwish (opset 14) into a model it declares opset 13
    newer.CopyFrom(model)
    newer.graph.node[1].op_type, newer.opset_import[0].version = "HardSwish", 13
    (folder / "newer_op.onnx").write_bytes(newer.SerializeToString())
    newer.graph.node[1].op_type = "Erfc"  # tf2onnx 1.17's, for Keras' exact GELU: TensorFlow's op, not ONNX's
    (folder / "no_such_op.onnx").write_bytes(newer.SerializeToString())
    custom = onnx.ModelProto()  # a custom op of the exporter's, which onnxruntime has no kernel for
    custom.CopyFrom(model)
    custom.graph.node[1].op_type, custom.graph.node[1].domain = "Swish", "com.example"
    custom.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    (folder / "custom_op.onnx").write_bytes(custom.SerializeToString())
    relu = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["image"], ["y"])], "relu", [model.graph.input[0]],
                                  [onnx.ValueInfoProto(name="y", type=model.graph.input[0].type)])
    relu_model = onnx.helper.make_model(relu, opset_imports=model.opset_import, ir_version=model.ir_version)
    onnx.save(relu_model, folder / "no_weights.onnx")
    onnx.save(graphs.zipmap_classifier(), folder / "zipmap.onnx")  # skl2onnx's default classifier output
    np.savez(folder / "features.npz", x=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    from qwt_onnx import quantize

    quantize(model, graphs.samples(model, 16, seed=1), folder / "quantized.onnx", qwt=False, progress=False)
    old_opset = onnx.load(folder / "quantized.onnx")  # quantize_static's per-channel weights of an opset-12 model
    old_opset.opset_import[0].version = 12
    onnx.save(old_opset, folder / "per_channel_opset12.onnx")
    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"image": graphs.samples(model, 1, seed=k)["image"]} for k in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(folder / "model.onnx"), str(folder / "qoperator.onnx"), Reader(), quant_format=QuantFormat.QOperator)
    return folder


@pytest.mark.slow
def test_quantizes_with_a_summary_and_a_report(files):
    out, report = files / "out.onnx", files / "report.json"
    result = _cli(files / "model.onnx", out, "--calib", files / "calib.npz", "--calib-method", "minmax", "--report", report)
    assert result.returncode == 0, result.stderr
    assert "4 blocks found" in result.stdout and "held-out output SQNR" in result.stdout and str(out) in result.stdout
    assert "GPTQ weight rounding, held-out gain over rounding to nearest: minmax" in result.stdout
    assert "channel equalization: 3 activations can move channel scales" in result.stdout
    onnx.checker.check_model(str(out))
    figures = json.loads(report.read_text())
    assert len(figures["blocks"]) == 4 and figures["samples"] == 48 and figures["method"] == "minmax"
    assert set(figures["gptq_gain_db"]) == {"minmax"} and figures["options"]["rounding"] == "auto"
    assert figures["equalizable"] == 3 and figures["options"]["equalization"] == "auto"
    steps = figures["step_seconds"]
    assert list(steps) == ["loading", "PTQ", "layer folds", "QwT", "writing"] and sum(steps.values()) <= figures["seconds"]
    assert f"(loading {steps['loading']:.1f} s, PTQ {steps['PTQ']:.1f} s" in result.stdout


@pytest.mark.slow
def test_affine_compensation_says_how_many_layers_it_folds_and_what_they_gain(files):
    out, report = files / "affine.onnx", files / "affine.json"
    result = _cli(files / "model.onnx", out, "--calib", files / "calib.npz", "--compensation", "affine", "--report", report)
    assert result.returncode == 0, result.stderr
    figures = json.loads(report.read_text())
    assert figures["layer_fold_layers"] == 9 and figures["layer_fold_samples"] == 48 and not figures["blocks"]
    summary = next(line for line in result.stdout.splitlines() if line.startswith("layer folds"))
    assert f"{figures['layer_folds']} of 9 layers" in summary and f"{figures['layer_folds_gain_db']:+.2f} dB" in summary
    assert figures["options"]["compensation"] == "affine" and figures["added_parameters"] == 0


def test_the_report_is_strict_json_where_a_figure_is_infinite():
    report = Report("ort", "minmax", 10, 2, method_sqnr_db={"minmax": float("inf")}, sqnr_ptq_db=float("inf"))
    strict = json.loads(report.to_json(), parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert strict["sqnr_ptq_db"] is None and strict["method_sqnr_db"] == {"minmax": None} and strict["samples"] == 10


@pytest.mark.slow
def test_importing_the_library_leaves_the_environment_alone():
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    code = "import os, qwt_onnx; qwt_onnx.quantize; print(sorted(set(os.environ) - set(%r)))" % sorted(env)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


@pytest.mark.slow
def test_no_qwt_writes_the_plain_ptq_model(files):
    out = files / "ptq.onnx"
    result = _cli(files / "model.onnx", out, "--calib", files / "calib.npz", "--no-qwt", "-q")
    assert result.returncode == 0 and result.stdout == ""
    assert not any(n.name.startswith("qwt/") for n in onnx.load(str(out)).graph.node)


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.onnx", "out.onnx", "--calib", "calib.npz"], "does not exist"),
        (["calib.npz", "out.onnx", "--calib", "calib.npz"], "not a valid ONNX model"),
        (["truncated.onnx", "out.onnx", "--calib", "calib.npz"], "not a valid ONNX model"),
        (["broken.onnx", "out.onnx", "--calib", "calib.npz"], "not a valid ONNX model"),
        (["newer_op.onnx", "out.onnx", "--calib", "calib.npz"], "HardSwish is an op of opset 14 and later"),
        (["no_such_op.onnx", "out.onnx", "--calib", "calib.npz"], "Erfc is no ONNX op"),
        (["custom_op.onnx", "out.onnx", "--calib", "calib.npz"], "onnxruntime cannot load the model ("),
        (["quantized.onnx", "out.onnx", "--calib", "calib.npz"], "already quantized"),
        (["qoperator.onnx", "out.onnx", "--calib", "calib.npz"], "already quantized, in onnxruntime's QOperator format"),
        (["model.onnx", "out.onnx", "--calib", "calib.npz", "--quantized", "qoperator.onnx"], "onnxruntime's QOperator format"),
        (["model.onnx", "out.onnx", "--calib", "calib.npz", "--quantized", "per_channel_opset12.onnx"],
         "per-channel QuantizeLinear and DequantizeLinear (their axis) need opset 13"),
        (["no_weights.onnx", "out.onnx", "--calib", "calib.npz"], "nothing to quantize: the model has no Conv"),
        (["zipmap.onnx", "out.onnx", "--calib", "features.npz"], "'probabilities' is a map or a sequence of maps"),
        (["model.onnx", "out.onnx", "--calib", "calib.npz", "--exclude-op-types", "Conv,Gemm"], "every compute op of the model"),
        (["model.onnx", "model.onnx", "--calib", "calib.npz"], "the output path is the input model"),
        (["model.onnx", "nowhere/out.onnx", "--calib", "calib.npz"], "output folder"),
        (["model.onnx", "out.onnx", "--calib", "calib.npz", "--samples", "0"], "--samples must be at least 1"),
        (["model.onnx", "out.onnx", "--calib", "calib.npz", "--batch-size", "-1"], "--batch-size must be at least 1"),
        (["model.onnx", "out.onnx", "--calib", "calib.npz", "--blocks", "nope,/layer1/relu_out"], "not in the model"),
        (["model.onnx", "out.onnx", "--calib", "model.onnx"], "cannot read calibration file"),
        (["model.onnx", "out.onnx", "--calib", "calib.npz", "--groups-factor", "-8"], "--groups-factor must be"),
        (["model.onnx", "out.onnx", "--calib", "calib.npz", "--kernel-size", "2"], "--kernel-size must be a positive odd"),
        (["model.onnx", "out.onnx", "--calib", "calib.npz", "--rounding", "up"], "invalid choice: 'up'"),
        (["model.onnx", "out.onnx", "--calib", "calib.npz", "--equalization", "maybe"], "invalid choice: 'maybe'"),
        (["model.onnx", "out.onnx", "--calib", "calib.npz", "--branch-rank", "0"], "--branch-rank must be auto, full or a positive"),
        (["model.onnx", "out.onnx", "--calib", "calib.npz", "--exclude-nodes", "/stem/(conv"], "not a valid regular expression"),
    ],
)
@pytest.mark.slow
def test_bad_input_exits_2_with_one_line_and_writes_nothing(files, args, message):
    before = sorted(os.listdir(files))
    result = _cli(*args, cwd=files)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(files)) == before


@pytest.mark.slow
def test_calibration_data_must_match_the_inputs(files, tmp_path):
    good = dict(np.load(files / "calib.npz"))
    cases = {
        "missing": ({}, "no array for model input"),
        "extra": ({**good, "mask": good["image"]}, "not model inputs"),
        "rank": ({"image": good["image"][:, 0]}, "rank"),
        "shape": ({"image": good["image"][:, :, :8]}, "shape"),
        "dtype": ({"image": good["image"].astype(np.complex64)}, "dtype"),
        "nan": ({"image": np.where(good["image"] > 2, np.nan, good["image"])}, "NaN"),
        "inf": ({"image": np.where(good["image"] > 2, np.inf, good["image"])}, "Inf"),
        "empty": ({"image": good["image"][:0]}, "empty"),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        result = _cli(files / "model.onnx", tmp_path / "out.onnx", "--calib", path)
        assert result.returncode == 2 and message in result.stderr, (name, result.stderr)
        assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_excluded_op_types_stay_float_and_an_unmatched_exclusion_is_reported(files):
    out = files / "excluded.onnx"
    result = _cli(files / "model.onnx", out, "--calib", files / "calib.npz", "--no-qwt",
                  "--exclude-op-types", "Gemm", "--exclude-nodes", "/no/such/conv", "--float-stem", "0")
    assert result.returncode == 0, result.stderr
    assert "'/no/such/conv' matches no Conv, MatMul or Gemm node" in result.stdout + result.stderr
    model = onnx.load(str(out))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert gemm.input[1] in {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 8
    assert all(n.input[1].endswith("_dequantized") for n in model.graph.node if n.op_type == "Conv")


@pytest.mark.parametrize(
    "failure, message",
    [(OSError(errno.ENOSPC, "No space left on device"), "no space left on device: the capture keeps"),
     (MemoryError(), "out of memory; pass a smaller --batch-size")],
    ids=["disk full", "memory"],
)
def test_a_run_out_of_disk_or_memory_exits_4_with_what_to_change_and_writes_nothing(files, tmp_path, monkeypatch, capsys,
                                                                                  failure, message):
    # DNSMOS's capture spilled 24 GB of block inputs to the temporary folder: where that device
    # fills up, the user needs the folder and the fix, not an "internal error"
    spill = tmp_path / "tmp"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    monkeypatch.setattr(capture, "DEFAULT_MEMORY_BUDGET", 0)  # spill every batch, however small
    monkeypatch.setattr(capture, "PEAK_MARGIN", 1 << 60)

    def fail(*args):
        raise failure

    monkeypatch.setattr(capture._SpillFiles, "write", fail)
    out = tmp_path / "out.onnx"
    code = cli.main([str(files / "model.onnx"), str(out), "--calib", str(files / "calib.npz"), "-q"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(lines) == 1 and lines[0].startswith(f"error: {message}")
    assert str(spill) in lines[0] or "memory" in message
    assert not out.exists() and os.listdir(spill) == []


def test_a_terminated_run_removes_its_spill_folder_and_writes_nothing(files, tmp_path):
    # a run stopped by `timeout` or a job scheduler's SIGTERM left its capture folder in /tmp:
    # here the signal comes as the capture keeps its first batch
    spill, out = tmp_path / "tmp", tmp_path / "out.onnx"
    spill.mkdir()
    code = (
        "import os, signal, sys\n"
        "from qwt_onnx import __main__ as cli\n"
        "from qwt_onnx.analysis import capture\n"
        "keep = capture._Stream.save\n"
        "def save(*args):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    keep(*args)\n"
        "capture._Stream.save = save\n"
        f"sys.exit(cli.main([{str(files / 'model.onnx')!r}, {str(out)!r}, '--calib', {str(files / 'calib.npz')!r}, '-q']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "TMPDIR": str(spill)})
    assert result.returncode == 128 + 15 and result.stderr.strip().splitlines()[-1] == "terminated; nothing was written"
    assert not out.exists() and not [name for name in os.listdir(spill) if name.startswith("qwt-")]  # onnxruntime's .ses stays


def test_a_full_device_under_the_spill_files_is_reported_as_no_space_left(tmp_path):
    # numpy's tofile reports a full device as a bare OSError ("Not enough free space to write ...",
    # no errno): a DNSMOS run with TMPDIR on a 1.5 GB tmpfs ended as an "internal error" that way.
    # The spill files are written with the file's own write, which raises ENOSPC
    os.symlink("/dev/full", tmp_path / "stream-0.bin")  # every write to /dev/full fails with ENOSPC
    spill = capture._SpillFiles(str(tmp_path))
    with pytest.raises(OSError) as failure:
        spill.write(("stream", 0), {"x": np.ones(1 << 20, np.float32)})
    spill.close()
    assert failure.value.errno == errno.ENOSPC
    assert cli.out_of_resources(failure.value).startswith("no space left on device: the capture keeps")
