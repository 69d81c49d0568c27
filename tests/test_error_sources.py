"""tools/error_sources.py: each block's output error split into its own and what it inherits."""

import importlib.util
import os

import numpy as np
import pytest

from qwt_onnx import quantize
from tests import graphs

_SPEC = importlib.util.spec_from_file_location(
    "error_sources", os.path.join(os.path.dirname(__file__), os.pardir, "tools", "error_sources.py")
)
error_sources = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(error_sources)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resnet")
    model = graphs.resnet()
    fp, ptq = folder / "fp.onnx", folder / "ptq.onnx"
    fp.write_bytes(model.SerializeToString())
    quantize(model, graphs.samples(model, 32, seed=0), ptq, qwt=False, float_stem=0, progress=False)
    return str(fp), str(ptq), graphs.samples(model, 8, seed=1)


def test_the_fp32_model_against_itself_has_no_error(resnet):
    fp, _, feeds = resnet
    rows = error_sources.block_errors(fp, fp, feeds, batch_size=4)
    assert rows and all(row["signal"] > 0 for row in rows)
    # the block run on its own may round a last bit apart from the whole model
    assert all(row["own"] + row["inherited"] + row["total"] < 1e-12 * row["signal"] for row in rows)


def test_the_first_block_inherits_nothing_and_the_later_ones_inherit_their_predecessors_error(resnet):
    fp, ptq, feeds = resnet
    rows = error_sources.block_errors(fp, ptq, feeds, batch_size=4)
    first, later = rows[0], rows[1:]
    assert first["inherited"] == 0.0 and first["own"] == pytest.approx(first["total"])
    assert later and all(row["inherited"] > 0 and row["own"] > 0 for row in later)
    # the two parts are nearly uncorrelated: together they make up the error at the output
    for row in later:
        assert row["own"] + row["inherited"] == pytest.approx(row["total"], rel=0.5)
    assert "| 0 |" in error_sources.markdown(rows) and np.isfinite([r["total"] for r in rows]).all()
