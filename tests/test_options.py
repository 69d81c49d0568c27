"""One options object: validated once, the command line generated from it."""

import argparse

import pytest

from qwt_onnx import InputError
from qwt_onnx.options import CalibMethod, Options, Target, WeightRange, add_arguments


def test_strings_become_typed_values_and_compare_equal_to_them():
    options = Options(target="trt", calib_method="entropy", exclude_nodes="conv1,fc.*")
    assert options.target is Target.TRT and options.target == "trt"
    assert options.calib_method is CalibMethod.ENTROPY and options.exclude_nodes == ("conv1", "fc.*")


def test_the_weight_range_follows_the_target_unless_it_is_given():
    assert Options().weights is WeightRange.PORTABLE
    assert Options().replace(target="trt").weights is WeightRange.FULL  # a default is never frozen in
    assert Options(target="trt", weight_range="portable").weights is WeightRange.PORTABLE


@pytest.mark.parametrize("changes, message", [
    ({"target": "tensorrt"}, "unknown --target 'tensorrt'; choose from ort, trt"),
    ({"samples": 0}, "--samples must be at least 1"),
    ({"kernel_size": 2}, "--kernel-size must be a positive odd number"),
    ({"min_gain": 1.0}, "--min-gain must be at least 0 and below 1"),
    ({"max_slowdown": 0.9}, "--max-slowdown must be at least 1"),
    ({"exclude_op_types": "Conv("}, "--exclude-op-types: 'Conv(' is not a valid regular expression"),
    ({"batch_size": "16"}, "--batch-size must be an integer"),
    ({"branch_rank": "half"}, "--branch-rank must be auto, full or a positive integer"),
    ({"branch_rank": -4}, "--branch-rank must be auto, full or a positive integer"),
    ({"float_stem": "two"}, "--float-stem must be auto or a depth"),
    ({"float_stem": -1}, "--float-stem must be auto or a depth"),
])
def test_a_bad_value_names_the_option_and_the_fix(changes, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("'", ".")):
        Options().replace(**changes)


def test_the_branch_rank_is_auto_full_or_a_number_given_as_text_or_not():
    assert Options().rank == 0 and Options(branch_rank="full").rank is None
    assert Options(branch_rank=16).rank == Options(branch_rank="16").rank == 16


def test_an_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="unknown option"):
        Options().replace(sample=3)


def test_the_command_line_has_one_flag_per_option_and_sets_only_those_given():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    given = vars(parser.parse_args(["--no-qwt", "--target", "trt", "--exclude-nodes", "a,b", "--min-gain", "0.2"]))
    assert given == {"qwt": False, "target": "trt", "exclude_nodes": "a,b", "min_gain": 0.2}
    options = Options(**given)
    assert not options.qwt and options.weights is WeightRange.FULL and options.exclude_nodes == ("a", "b")
    assert "(default 512)" in parser.format_help() and "--weight-range {portable,full}" in parser.format_help()
