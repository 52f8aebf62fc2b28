"""CPU training speed of the DC-CNN blocks' convolution weight gradient, ours against PyTorch's.

Usage::

    python -m benchmarks.bench_conv                  # 320 x 320, batch 4
    python -m benchmarks.bench_conv --size 160 --rounds 7
    python -m benchmarks.bench_conv --cases conv --out-chans 2 --batch 1 --size 96 --min-positions 0
    python -m benchmarks.bench_conv --presets paper   # the authors' 1-channel D5C5 / D3C5

:class:`~sftkd_fastmri.models.conv.BlockConv2d` computes the weight and bias gradients of the
blocks' 32 -> 32 convolutions itself on the CPU (nine matrix products over channels-last
views, :func:`~sftkd_fastmri.models.conv.shifted_weight_gradient`) and takes the input
gradient from PyTorch. This script times, round-robin in one process
(:func:`benchmarks.common.interleaved_samples`), each of these with that path and with
PyTorch's own backward (:func:`~sftkd_fastmri.models.conv.use_native_weight_gradient`):

* ``conv``: one 32 -> 32 convolution (``--chans``, ``--out-chans``), forward and backward
  (weight, bias and input gradients);
* ``d5_cascade`` / ``d3_cascade``: one D5 / D3 cascade (block + DC), forward and backward, of
  the ``--presets`` D5C5 / D3C5;
* ``d5c5_step`` / ``d3c5_step``: a training step (forward, L1, backward, Adam).

It prints the speed-up (PyTorch's time / ours) of each, and the largest difference between the
two weight gradients of the convolution relative to their largest entry (they differ by float32
rounding: the sums run in another order).
"""

from __future__ import annotations

import argparse
import json
from typing import Callable, Dict

import torch

from benchmarks.common import (
    add_malloc_option,
    apply_malloc,
    cascade_step,
    interleaved_samples,
    median,
    round_ratios,
    synthetic_batch,
    training_step,
)

#: ``--presets``: the D5C5 and D3C5 the cascade and step cases build.
PRESETS = {
    "standard": ("dccnn_d5c5", "dccnn_d3c5"),  # complex images as 2 channels
    "paper": ("dccnn_d5c5_paper", "dccnn_d3c5_paper"),  # the authors' 1-channel real images
}


def _with_path(native: bool, fn: Callable[[], None]) -> Callable[[], None]:
    from sftkd_fastmri.models.conv import use_native_weight_gradient

    def call() -> None:
        use_native_weight_gradient(native)
        try:
            fn()
        finally:
            use_native_weight_gradient(False)

    return call


def _conv_tensors(args: argparse.Namespace):
    """Channels-last input (requiring grad) and output gradient of the 'conv' case."""
    size = (args.batch, args.chans, args.size, args.size)
    x = torch.randn(size).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    grad = torch.randn(args.batch, args.out_chans, args.size, args.size)
    return x, grad.contiguous(memory_format=torch.channels_last)


def _conv_step(args: argparse.Namespace) -> Callable[[], None]:
    from sftkd_fastmri.models.conv import BlockConv2d

    torch.manual_seed(0)
    conv = BlockConv2d(args.chans, args.out_chans, 3, padding=1)
    x, grad = _conv_tensors(args)

    def step() -> None:
        conv.zero_grad(set_to_none=True)
        x.grad = None
        conv(x).backward(grad)

    return step


def _weight_gradient_difference(args: argparse.Namespace) -> float:
    from sftkd_fastmri.models.conv import BlockConv2d

    torch.manual_seed(0)
    conv = BlockConv2d(args.chans, args.out_chans, 3, padding=1)
    x, grad = _conv_tensors(args)
    grads = []
    for native in (True, False):
        _with_path(native, lambda: grads.extend(torch.autograd.grad(conv(x), conv.weight, grad)))()
    return float((grads[0] - grads[1]).abs().max() / grads[0].abs().max())


def _path_taken(args: argparse.Namespace) -> bool:
    """Whether the 'conv' case's convolution (and a block's 32 -> 32 ones, at the default
    channels) takes the CPU path at this batch and size."""
    from sftkd_fastmri.models.conv import BlockConv2d

    conv = BlockConv2d(args.chans, args.out_chans, 3, padding=1)
    x = torch.empty(args.batch, args.chans, args.size, args.size)
    return conv._shifted_path(x.contiguous(memory_format=torch.channels_last))


def measure(args: argparse.Namespace) -> Dict:
    masked, mask, sens, target = synthetic_batch(args.batch, args.size, args.size, 1, "cpu")
    inputs = (masked, mask, sens)
    teacher, student = PRESETS[args.presets]
    cases = {
        "conv": lambda: _conv_step(args),
        "d5_cascade": lambda: cascade_step(teacher, inputs),
        "d3_cascade": lambda: cascade_step(student, inputs),
        "d5c5_step": lambda: training_step(teacher, inputs, target),
        "d3c5_step": lambda: training_step(student, inputs, target),
    }
    cases = {name: make for name, make in cases.items() if name in args.cases}
    fns: Dict[str, Callable[[], None]] = {}
    for name, make in cases.items():
        fns[f"{name}/pytorch"] = _with_path(True, make())
        fns[f"{name}/ours"] = _with_path(False, make())
    samples = interleaved_samples(fns, "cpu", warmup=args.warmup, rounds=args.rounds)
    rows = []
    for name in cases:
        native, ours = samples[f"{name}/pytorch"], samples[f"{name}/ours"]
        rows.append(
            {
                "case": name,
                "pytorch_s": median(native),
                "ours_s": median(ours),
                "speedup": median(native) / median(ours),
                "round_speedups": round_ratios(native, ours),
            }
        )
    return {
        "size": args.size,
        "batch": args.batch,
        "chans": args.chans,
        "out_chans": args.out_chans,
        "presets": list(PRESETS[args.presets]),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "path_taken": _path_taken(args),
        "rows": rows,
        "weight_gradient_relative_difference": _weight_gradient_difference(args),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size", type=int, default=320, help="image height = width")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--chans", type=int, default=32, help="input channels of the 'conv' case")
    parser.add_argument(
        "--out-chans", type=int, default=None, help="its output channels (default: --chans)"
    )
    parser.add_argument(
        "--min-positions",
        type=int,
        default=None,
        help="set sftkd_fastmri.models.conv.MIN_POSITIONS and MIN_POSITIONS_THIN_INPUT for "
        "this run (time smaller sizes)",
    )
    parser.add_argument(
        "--presets",
        choices=sorted(PRESETS),
        default="standard",
        help="the D5C5 / D3C5 of the cascade and step cases: 'standard' (2-channel complex "
        "images) or 'paper' (the authors' 1-channel real images, padded by 5)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed round-robin rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["conv", "d5_cascade", "d3_cascade", "d5c5_step", "d3c5_step"],
        choices=["conv", "d5_cascade", "d3_cascade", "d5c5_step", "d3c5_step"],
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_malloc_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args()
    if args.out_chans is None:
        args.out_chans = args.chans
    if args.min_positions is not None:
        import sftkd_fastmri.models.conv as conv

        conv.MIN_POSITIONS = conv.MIN_POSITIONS_THIN_INPUT = args.min_positions
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = apply_malloc(args.malloc, "cpu")
    result = measure(args)
    result["malloc"] = malloc
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"CPU convolution backward, ours vs PyTorch's: batch {args.batch}, "
        f"{args.size}x{args.size}, {result['threads']} threads, malloc {malloc}, median of "
        f"{args.rounds} interleaved rounds; presets {', '.join(result['presets'])}"
    )
    if not result["path_taken"]:
        from sftkd_fastmri.models.conv import MIN_POSITIONS, MIN_POSITIONS_THIN_INPUT

        print(
            f"note: the path does not apply to a {args.chans} -> {args.out_chans} convolution "
            f"at {args.batch * args.size**2} positions (MIN_POSITIONS = {MIN_POSITIONS}, "
            f"MIN_POSITIONS_THIN_INPUT = {MIN_POSITIONS_THIN_INPUT}, see "
            "sftkd_fastmri.models.conv): both variants run PyTorch's backward"
        )
    print(f"{'case':<12}{'PyTorch ms':>12}{'ours ms':>10}{'speed-up':>10}{'per round q1-q3':>18}")
    for row in result["rows"]:
        spread = row["round_speedups"]
        print(
            f"{row['case']:<12}{row['pytorch_s'] * 1e3:>12.1f}{row['ours_s'] * 1e3:>10.1f}"
            f"{row['speedup']:>10.2f}{spread['q1']:>11.2f}-{spread['q3']:.2f}"
        )
    print(
        "largest weight-gradient difference (ours - PyTorch's) / largest entry: "
        f"{result['weight_gradient_relative_difference']:.1e}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
