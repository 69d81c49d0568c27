"""Where the error at each block's output comes from: the block itself, or the blocks before it.

    python tools/error_sources.py zoo:orientation ptq.onnx [--report qwt.json] [--samples 32]
    python tools/error_sources.py model.onnx ptq.onnx --data eval.npz

For every block qwt_onnx finds in the FP32 model, on samples of the evaluation set (a zoo
model's; calibration never sees them), with ``ptq.onnx`` a QDQ model of it whose tensors mean
what the FP32 model's of the same names mean (qwt_onnx's ``--no-qwt`` model with
``--equalization off``: equalization rescales channels between layers):

- ``y``: the FP32 model's block output; ``y_q``: the quantized model's, on its own block
  input ``x_q``; ``f(x_q)``: the FP32 block run on that same input. A tensor that only
  quantizers read is taken after its DequantizeLinear, as QwT's capture takes it: the rounding
  of a block's output counts as that block's error, not the next one's;
- *own* error ``‖f(x_q) − y_q‖²``: what the block's quantization adds, and all that a QwT
  branch on ``x_q`` is fitted to remove; *inherited* ``‖y − f(x_q)‖²``: what the blocks before
  it passed on, carried through the block;
- the SQNR of ``x_q`` at the block input and of ``y_q`` at its output, the own error's share
  of ``‖y − y_q‖²``, and the SQNR the inherited error alone gives there: what a branch that
  removed all of the block's own error would leave at that point. Where that is far below the
  input's SQNR, the block amplifies the error it is given (a depthwise convolution whose
  folded BatchNorm scales some channels up: the noise of a per-tensor quantizer there is
  multiplied with them).

A branch that removes a fraction ``r`` of its block's own error changes the error at that
point by at most about ``r × share`` (less where the two parts are correlated), before the
rest of the network amplifies or damps it. So where the own shares are small everywhere,
QwT's branches cannot move the outputs much, whatever their R²; where the SQNR falls most
from one block to the next is where the error is made.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwt_onnx import api, zoo  # noqa: E402
from qwt_onnx.analysis import blocks as blk  # noqa: E402
from qwt_onnx.graph import extract as ex  # noqa: E402
from qwt_onnx.graph import prepare  # noqa: E402
from qwt_onnx.graph import query as g  # noqa: E402
from qwt_onnx.runtime import Runner, count_samples, samples_axes, take  # noqa: E402


def block_errors(fp_path: str, q_path: str, feeds: dict[str, np.ndarray], batch_size: int) -> list[dict]:
    """Per block: its name, and the signal, own and inherited error energies and the total
    error at its output, summed over ``feeds``."""
    fp, q = api.load_fp32(fp_path), prepare.prepare(prepare.load_model(q_path, "quantized model"))
    found = blk.find_blocks(fp)
    q_values = g.values_by_name(q.graph)

    def as_read(name: str) -> str:  # a tensor that only quantizers read, as their DequantizeLinear gives it
        view = g.quantized_only_view(q_values[name])
        return view.name if view is not None else name

    # as the capture's stream carries them: a block input that an earlier block outputs as that
    # block's output is compared; any other (a graph input) as the quantized graph computes it
    outputs = {b.output for b in found}
    q_input = {b.name: as_read(b.input) if b.input in outputs else b.input for b in found}
    q_output = {b.name: as_read(b.output) for b in found}
    fp_blocks = {b.name: ex.extract(fp, [b.input], [b.output]) for b in found}
    fp_wanted = sorted({b.input for b in found} | {b.output for b in found} | {name for sub in fp_blocks.values() for name in sub.context})
    fp_run = Runner(ex.context_model(fp, fp_wanted).proto)
    q_run = Runner(ex.context_model(q, sorted({*q_input.values(), *q_output.values()})).proto)
    block_runs = {name: Runner(sub.proto) for name, sub in fp_blocks.items()}
    totals = {b.name: np.zeros(6) for b in found}  # signal, own, inherited, total; the input's signal and error
    axes = samples_axes(fp_path)[0]
    for start in range(0, count_samples(feeds, axes), batch_size):
        batch = take(feeds, axes, slice(start, start + batch_size))
        y_fp, y_q = fp_run(batch), q_run(batch)
        for block in found:
            x, x_q = y_fp[block.input], y_q[q_input[block.name]]
            local = block_runs[block.name]({**batch, **y_fp, block.input: x_q})[block.output]
            y, quantized = y_fp[block.output], y_q[q_output[block.name]]
            totals[block.name] += [_energy(y), _energy(local - quantized), _energy(y - local), _energy(y - quantized),
                                   _energy(x), _energy(x - x_q)]
    keys = ("signal", "own", "inherited", "total", "input_signal", "input_error")
    return [{"block": b.name, **{key: float(value) for key, value in zip(keys, totals[b.name])}} for b in found]


def _energy(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64).ravel()
    return float(x @ x)


def _db(signal: float, noise: float) -> float:
    return 10.0 * np.log10(signal / noise) if noise > 0 else float("inf")


def markdown(rows: list[dict], fits: dict[str, dict] | None = None) -> str:
    """The rows as a table; with ``fits`` (a QwT report's blocks, by name), each branch's held-out
    R² and the share of its block's own error it removes, and so about what it removes of the
    whole error there: the two shares multiplied."""
    head = "| # | block | SQNR: input → output | own error's share | output without its own error |"
    if fits is not None:
        head += " branch R², held out | own error removed | ≈ error there removed |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for i, row in enumerate(rows):
        share = row["own"] / row["total"] if row["total"] else 0.0
        line = (f"| {i} | {row['block']} | {_db(row['input_signal'], row['input_error']):.1f} → {_db(row['signal'], row['total']):.1f} dB "
                f"| {100 * share:.0f}% "
                f"| {_db(row['signal'], row['inherited']):.1f} dB |")
        fit = (fits or {}).get(row["block"])
        if fits is not None and fit is not None and fit.get("error_ratio_heldout") is not None:
            removed = 1.0 - fit["error_ratio_heldout"]
            line += f" {fit['r2_heldout']:.2f} | {100 * removed:.0f}% | {100 * removed * share:.1f}% |"
        elif fits is not None:
            line += " — | — | — |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the FP32 model, or zoo:NAME (its evaluation set is the data)")
    parser.add_argument("quantized", help="a QDQ model of it with the FP32 tensor names (qwt_onnx --no-qwt)")
    parser.add_argument("--data", help=".npz of model inputs, samples on axis 0 (not needed for zoo:NAME)")
    parser.add_argument("--report", help="a qwt_onnx --report of a QwT run on the same PTQ settings: its branches' fits")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    if args.model.startswith("zoo:"):
        prepared = zoo.prepare(args.model[4:])
        model, (feeds, _) = prepared.model, zoo.load_evaluation(prepared)
    else:
        model, data = args.model, np.load(args.data)
        feeds = {name: data[name] for name in data.files}
    axes = samples_axes(model)[0]
    feeds = take(feeds, axes, slice(None, args.samples))
    fixed = {prepare.dims(v)[axes[v.name]] for v in prepare.load_model(model).graph.inputs if axes.get(v.name) is not None}
    batch_size = fixed.pop() if len(fixed) == 1 and isinstance(next(iter(fixed)), int) else args.batch_size
    fits = None
    if args.report:
        with open(args.report) as f:
            fits = {block["name"]: block for block in json.load(f)["blocks"]}
    print(markdown(block_errors(model, args.quantized, feeds, batch_size), fits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
