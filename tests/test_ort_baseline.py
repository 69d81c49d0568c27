"""tools/ort_baseline.py: quantize_static, the baseline, is fed batches the model runs."""

import importlib.util
import os

import numpy as np
import onnx
from onnx import numpy_helper

from tests import graphs

_SPEC = importlib.util.spec_from_file_location(
    "ort_baseline", os.path.join(os.path.dirname(__file__), os.pardir, "tools", "ort_baseline.py")
)
ort_baseline = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ort_baseline)


def test_a_model_that_does_not_batch_samples_is_calibrated_one_sample_at_a_time(tmp_path):
    # a batch of one fixed inside the graph (AECMOS's GRU state, PLCMOS's output squeezed to a scalar):
    # 16 samples a run fail there, or give quantize_static's calibrator a tensor that mixes them
    model = graphs.resnet()
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 10], np.int64), "/flat_shape"))
    model.graph.node.append(onnx.helper.make_node("Reshape", ["logits", "/flat_shape"], ["flat"]))
    model.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info("flat", onnx.TensorProto.FLOAT, [1, "n"]))
    calib = tmp_path / "calib.npz"
    np.savez(calib, **graphs.samples(model, 24, seed=1))
    for built, batch in ((model, 1), (graphs.resnet(), 16)):
        path = str(tmp_path / "model.onnx")
        onnx.save(built, path)
        reader = ort_baseline.calibration_reader(path, str(calib), 20, 16)
        assert len(reader) == 20 // batch + (20 % batch > 0)
        assert reader.get_next()["image"].shape[0] == batch
