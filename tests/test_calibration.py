"""Memory: calibration files are read from disk batch by batch, captured tensors spill to disk."""

import sys

import numpy as np
import onnx_ir as ir
import pytest

from qwt_onnx import calibration, memory, observe, quantize_with_report
from qwt_onnx.analysis import blocks, capture
from qwt_onnx.analysis.placement import place
from qwt_onnx.calibration import CalibrationSet, InputSpec
from qwt_onnx.errors import InputError
from qwt_onnx.graph import prepare
from qwt_onnx.numerics.ranges import compute_range
from qwt_onnx.passes import qdq
from qwt_onnx.report import format_summary
from tests import graphs

SPECS = [InputSpec("image", np.dtype(np.float32), (None, 3, 4)), InputSpec("ids", np.dtype(np.int64), (None, 5))]


def _arrays(count=37):
    rng = np.random.default_rng(0)
    return {"image": rng.standard_normal((count, 3, 4)).astype(np.float32), "ids": rng.integers(0, 9, (count, 5))}


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_files_give_the_same_batches_as_numpy_load(tmp_path, save):
    arrays = _arrays()
    save(tmp_path / "calib.npz", **arrays)
    calib = CalibrationSet.load(tmp_path / "calib.npz", SPECS)
    assert isinstance(calib.arrays["image"], np.memmap) == (save is np.savez)  # stored members are mapped
    batches = list(calib.batches(8, np.arange(3, 30, 2)))
    for batch in batches:
        for name, array in arrays.items():
            np.testing.assert_array_equal(batch.feeds[name], array[batch.indices])
            assert batch.feeds[name].flags.c_contiguous and not isinstance(batch.feeds[name], np.memmap)


def test_a_npy_file_is_memory_mapped(tmp_path):
    image = _arrays()["image"]
    np.save(tmp_path / "calib.npy", image)
    calib = CalibrationSet.load(tmp_path / "calib.npy", SPECS[:1], 20)
    assert isinstance(calib.arrays["image"], np.memmap) and calib.num_samples == 20
    np.testing.assert_array_equal(next(calib.batches(20)).feeds["image"], image[:20])


def test_nan_is_found_in_any_chunk_of_a_mapped_file(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "CHECK_ROWS", 4)
    arrays = _arrays()
    arrays["image"][33, 1, 2] = np.nan
    np.savez(tmp_path / "calib.npz", **arrays)
    with pytest.raises(calibration.InputError, match="NaN or Inf"):
        CalibrationSet.load(tmp_path / "calib.npz", SPECS)


def test_only_the_samples_taken_are_checked_for_nan(tmp_path):
    arrays = _arrays()
    arrays["image"][33, 1, 2] = np.nan
    np.savez(tmp_path / "calib.npz", **arrays)
    assert CalibrationSet.load(tmp_path / "calib.npz", SPECS, 33).num_samples == 33
    with pytest.raises(calibration.InputError, match="NaN or Inf"):
        CalibrationSet.load(tmp_path / "calib.npz", SPECS, 34)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed, np.save])
def test_samples_of_different_shapes_are_refused_with_how_to_stack_them(tmp_path, save):
    # numpy saves a list of differently sized images (a text line recogniser's) as an object array
    ragged = np.empty(3, dtype=object)
    for i in range(3):
        ragged[i] = np.zeros((3, 4 + i), np.float32)
    if save is np.save:
        path, specs = tmp_path / "calib.npy", SPECS[:1]
        save(path, ragged)
    else:
        path, specs = tmp_path / "calib.npz", SPECS
        save(path, image=ragged, ids=_arrays(3)["ids"])
    with pytest.raises(InputError, match=r"holds Python objects, .* stacked on axis 0 at one shape"):
        CalibrationSet.load(path, specs)


def test_whole_model_scores_use_a_bounded_number_of_heldout_samples(monkeypatch):
    monkeypatch.setattr(calibration, "SCORING_SAMPLES", 3)
    calib = CalibrationSet(_arrays(count=40), SPECS)
    assert calib.heldout_mask.sum() == 8
    assert np.flatnonzero(calib.scoring_mask).tolist() == [4, 9, 14]


@pytest.mark.parametrize("memory_budget", [0, 1 << 14])  # all spilled; some held, some spilled, slots moving
def test_captured_tensors_spilled_to_disk_give_the_same_fits_as_in_memory(memory_budget):
    fp = prepare.prepare(ir.serde.deserialize_model(graphs.resnet()))
    calib = CalibrationSet(graphs.samples(graphs.resnet(), 40, seed=1), prepare.input_specs(fp))
    placement = place(fp.graph, "ort")
    observers = observe.observe(prepare.to_proto(fp), placement.observed_names, calib, 8).ranges
    q = fp.clone()
    qdq.InsertQdqPass({n: compute_range(o, "percentile") for n, o in observers.items()}, "ort")(q)
    found = blocks.find_blocks(fp)
    held = capture.fit_blocks(fp, q, found, calib, 8, exact_boundaries=True)
    spilled = capture.fit_blocks(fp, q, found, calib, 8, exact_boundaries=True, memory_budget=memory_budget)
    assert len(held) == len(spilled) == len(found)
    for a, b in zip(held, spilled):
        np.testing.assert_array_equal(a.result.fit.weight, b.result.fit.weight)
        np.testing.assert_array_equal(a.result.fit.bias, b.result.fit.bias)


def test_statistics_updated_on_the_calling_thread_are_those_updated_on_the_pool(monkeypatch):
    fp = prepare.prepare(ir.serde.deserialize_model(graphs.resnet()))
    calib = CalibrationSet(graphs.samples(graphs.resnet(), 24, seed=1), prepare.input_specs(fp))
    placement = place(fp.graph, "ort")
    seen = []
    for threshold in (0, 1 << 40):  # every tensor on the pool; none
        monkeypatch.setattr(observe, "THREADED_UPDATE_ELEMENTS", threshold)
        seen.append(observe.observe(prepare.to_proto(fp), placement.observed_names, calib, 8, placement.channel_axes()))
    pooled, serial = seen
    assert pooled.ranges.keys() == serial.ranges.keys() and pooled.means
    for name, observer in pooled.ranges.items():
        assert (observer.low, observer.high) == (serial.ranges[name].low, serial.ranges[name].high)
        np.testing.assert_array_equal(observer.histogram, serial.ranges[name].histogram)
    for name, mean in pooled.means.items():
        np.testing.assert_array_equal(mean, serial.means[name])
        np.testing.assert_array_equal(pooled.powers[name], serial.powers[name])


def test_the_process_peak_and_resident_set_are_read_on_linux():
    if not sys.platform.startswith("linux"):  # read from /proc and getrusage
        assert memory.resident() is None and memory.peak() is None
        return
    block = np.ones(1 << 28, dtype=np.uint8)  # 256 MiB, touched so that it is resident
    del block  # numpy gives a block this large back to the system at once
    assert memory.peak() - memory.resident() >= 200 << 20


@pytest.mark.parametrize("ceiling, held", [(None, False), (0, False), (1 << 50, True)])
def test_the_stream_holds_batches_beyond_its_budget_only_below_the_memory_ceiling(tmp_path, ceiling, held):
    calib = CalibrationSet(_arrays(), SPECS)
    stream = capture._Stream(str(tmp_path), calib, 8, contexts=None, memory_budget=0, ceiling=ceiling)
    stream.save("stream", 0, {"x": np.ones((8, 4), np.float32)})
    assert bool(stream.in_memory) == (held and memory.resident() is not None)
    np.testing.assert_array_equal(stream.load("stream", 0)["x"], np.ones((8, 4), np.float32))
    stream.close()


def test_a_sample_is_held_out_with_its_duplicates_mirror_images_and_rotations():
    arrays = _arrays(count=40)
    image, ids = arrays["image"], arrays["ids"]
    # the user's augmentation: each sample mirrored, then a few rotated and a few copied as they are
    augmented = {"image": np.concatenate([image, image[:, :, ::-1], np.rot90(image[:10], 2, axes=(1, 2)), image[20:25]]),
                 "ids": np.concatenate([ids, ids, ids[:10], ids[20:25]])}
    calib = CalibrationSet(augmented, SPECS)
    groups, held = calib.repeats, calib.heldout_mask
    assert groups.max() == 39 and np.array_equal(groups[:40], np.arange(40))  # the originals keep their order
    for group in range(40):
        assert len(set(held[groups == group])) == 1  # all of a group held out, or none
    assert np.array_equal(np.flatnonzero(held[:40]), np.arange(4, 40, 5))  # every fifth, as without repeats
    assert np.array_equal(held[40:80], held[:40]) and np.array_equal(held[80:], held[list(range(10)) + list(range(20, 25))])
    # a repeat moves no other sample to the other side of every fifth: a copy of the first sample
    # second leaves the fifth sample held out
    early = CalibrationSet({name: np.concatenate([array[:1], array]) for name, array in arrays.items()}, SPECS)
    assert np.array_equal(early.heldout_mask, np.arange(41) % 5 == 4)
    # repeats in runs of five: every fifth group, not every group whose first sample is fifth
    runs = CalibrationSet({name: np.repeat(array, 5, axis=0) for name, array in arrays.items()}, SPECS)
    assert np.array_equal(runs.heldout_mask, np.repeat(np.arange(40) % 5 == 4, 5))
    # the first samples are held out as in the whole set: a trial on them keeps the whole set's split
    assert np.array_equal(calib.take(50).heldout_mask, held[:50])
    # distinct samples: every fifth, as ever; a different other input makes another sample
    assert np.array_equal(CalibrationSet(arrays, SPECS).repeats, np.arange(40))
    other_ids = {"image": augmented["image"], "ids": augmented["ids"] + np.arange(len(augmented["ids"]))[:, None]}
    assert np.array_equal(CalibrationSet(other_ids, SPECS).repeats, np.arange(len(augmented["ids"])))


def test_repeats_are_reported_and_not_counted_as_held_out_evidence():
    model = graphs.resnet()
    calib = graphs.samples(model, 20, seed=1)
    mirrored = {name: np.concatenate([array, array[..., ::-1]]) for name, array in calib.items()}
    _, report = quantize_with_report(model, mirrored, qwt=False, progress=False)
    assert report.repeated_samples == 20 and report.heldout_samples == 8
    assert any("only 4 distinct held-out calibration samples" in w for w in report.warnings)
    assert "20 calibration samples repeat the values of others" in format_summary(report, "m.onnx")


def test_a_choice_made_on_fewer_than_32_held_out_samples_is_flagged():
    model = graphs.resnet()
    few = graphs.samples(model, 20, seed=1)  # every fifth held out: 4
    _, report = quantize_with_report(model, few, qwt=False, progress=False)
    assert any("only 4 distinct held-out calibration samples decide the calibration method, bias correction" in w
               and "at least 160 calibration samples" in w for w in report.warnings)
    _, report = quantize_with_report(model, few, qwt=False, calib_method="minmax", bias_correction="off", progress=False)
    assert not any("held-out calibration samples decide" in w for w in report.warnings)  # nothing was chosen
    _, report = quantize_with_report(model, graphs.samples(model, 160, seed=1), qwt=False, progress=False)
    assert not any("held-out calibration samples decide" in w for w in report.warnings)


def test_inputs_with_samples_on_another_axis_or_none_are_batched_along_it():
    # a recurrent state [layers, batch, C] holds its samples on axis 1; a sample rate is one
    # scalar fed with every batch
    specs = [InputSpec("audio", np.dtype(np.float32), (None, 4)), InputSpec("state", np.dtype(np.float32), (2, None, 3), 1),
             InputSpec("sr", np.dtype(np.int64), (), None)]
    rng = np.random.default_rng(0)
    arrays = {"audio": rng.standard_normal((10, 4)).astype(np.float32), "state": rng.standard_normal((2, 10, 3)).astype(np.float32),
              "sr": np.array(16000)}
    calib = CalibrationSet.load(arrays, specs, num_samples=7)
    assert calib.num_samples == 7 and calib.take(5).num_samples == 5
    batch = list(calib.batches(4, np.array([1, 3, 6])))[0]
    np.testing.assert_array_equal(batch.feeds["state"], arrays["state"][:, [1, 3, 6]])
    np.testing.assert_array_equal(batch.feeds["audio"], arrays["audio"][[1, 3, 6]])
    assert batch.feeds["sr"].shape == () and batch.feeds["sr"] == 16000
    with pytest.raises(InputError, match="sample counts .*audio: 10, state: 9"):
        CalibrationSet({**arrays, "state": arrays["state"][:, :9]}, specs)
    with pytest.raises(InputError, match="rank 1 .* as the value fed with every batch"):
        CalibrationSet({**arrays, "sr": np.array([16000])}, specs)
    with pytest.raises(InputError, match="rank 2 .* with the samples on axis 1"):
        CalibrationSet({**arrays, "state": arrays["state"][0]}, specs)


def test_images_in_another_axis_order_or_as_bytes_are_named_as_such():
    # a channels-last model (a TFLite export) calibrated with channels-first images, or with raw image bytes
    spec = InputSpec("image", np.dtype(np.float32), (1, 8, 6, 3))
    images = np.random.default_rng(0).random((5, 8, 6, 3)).astype(np.float32)
    with pytest.raises(InputError, match=r"save np.transpose\(samples, \(0, 2, 3, 1\)\): its axes are in another order"):
        CalibrationSet({"image": images.transpose(0, 3, 1, 2)}, [spec])
    with pytest.raises(InputError, match="resize the samples to match"):
        CalibrationSet({"image": images[:, :7]}, [spec])
    assert CalibrationSet({"image": images}, [spec]).unscaled == []
    assert CalibrationSet({"image": (images * 255).astype(np.uint8)}, [spec]).unscaled == ["image"]
    assert CalibrationSet(_arrays(), SPECS).unscaled == []  # token ids for an integer input
    model = graphs.resnet()
    pixels = np.random.default_rng(0).integers(0, 256, (40, 3, 16, 16), dtype=np.uint8)
    _, report = quantize_with_report(model, {"image": pixels}, qwt=False, progress=False, calib_method="minmax")
    assert any("'image' holds uint8 values for a float input: they are fed unscaled" in w for w in report.warnings)


def test_a_state_with_its_samples_on_another_axis_is_named_with_the_transposition_that_fits():
    # a GRU state [batch, 1, 128] of a streaming VAD (akiki), saved as [1, N, 128] as onnxruntime's GRU holds it
    spec = InputSpec("h", np.dtype(np.float32), (None, 1, 128), samples_axis=0)
    states = np.zeros((1, 512, 128), np.float32)
    fix = (r"its samples look to be on axis 1: save np.transpose\(samples, \(1, 0, 2\)\), shaped \(512, 1, 128\), "
           "with the samples on axis 0")
    with pytest.raises(InputError, match=fix):
        CalibrationSet({"h": states}, [spec])
    assert CalibrationSet({"h": states.transpose(1, 0, 2)}, [spec]).num_samples == 512


def test_the_samples_axis_of_each_input_follows_the_batch_dimension_that_leads_the_inputs():
    assert calibration.leading_batch([[], ["N", 4]]) == "N" and calibration.leading_batch([[1, 576], [2, 1, 128]]) == 1
    shapes = (["N", 4], [2, "N", 128], [], [3, 4], [None, 4])  # a static [3, 4] beside batch N: one value for all
    assert [calibration.samples_axis(dims, "N") for dims in shapes] == [0, 1, None, None, 0]
    assert [calibration.samples_axis(dims, 1) for dims in ([1, 576], [2, 1, 128])] == [0, 1]
    # no batch named (a spox export: every dynamic dimension unnamed): a state [2, ?, 128] holds them on its dynamic axis
    unnamed = ([None, None], [2, None, 128], [2, None, None], [])
    assert calibration.leading_batch(unnamed) is None
    assert [calibration.samples_axis(dims, None) for dims in unnamed] == [0, 1, 0, None]
