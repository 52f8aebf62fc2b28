"""Cost of an SFT training step relative to a plain teacher training step.

Usage::

    python -m benchmarks.bench_sft                      # D5C5 / D3C5, 320 x 320, batch 4
    python -m benchmarks.bench_sft --device cuda --rounds 10
    python -m benchmarks.bench_sft --size 160 --batch 2 --rounds 3

One SFT step (Matcha et al., "SFT-KD-Recon", MIDL 2023, Algorithm 1) =
:class:`~sftkd_fastmri.sft.StudentFriendlyTeacher` forward in training mode (teacher once,
then every student branch) + :class:`~sftkd_fastmri.sft.SFTLoss` (L1) + backward + Adam step.
One teacher step = teacher forward + L1 + backward + Adam step. The ratio SFT / teacher is what
the SFT stage costs per epoch relative to training the teacher alone.

Expected ratio: the ``N - 1`` branches run ``N(N-1)/2`` student cascades (10 for ``N = 5``)
next to the teacher's ``N``. A D3 cascade has about a third of a D5 cascade's
multiply-adds, which would add about 0.7 of a teacher step (target ratio <= 1.8). Measured, a
D3 cascade costs 0.46-0.49 of a D5 cascade on a 2-core CPU and 0.61-0.72 on an H200 GPU (batch 16
and 4): the 2->32 and 32->2 convolutions (whose weight gradients are the slowest kernels of a
step on the GPU, see ``--profile``), the bias, ReLU and DC passes do not shrink with depth,
which predicts 1 + 2 x that cost = 1.93-1.98 (CPU) and 2.2-2.4 (GPU). The script therefore also
times one teacher and one student cascade (forward + backward) and prints the ratio those costs
predict, so a miss can be told apart from wrapper overhead; ``--profile`` splits both steps'
profiled time into the convolutions and everything else (DC, wrapper, loss, optimiser), in
units of the teacher step. From the two cascades' costs it also fits
``cascade = fixed + (depth - 2) x per_layer`` (:func:`cascade_cost_model`) and prints the
largest ``fixed`` part, what does not shrink with depth, for which the target would hold.
With ``batch_branches=True`` (the default on CUDA) the active branches of each student
cascade run as one batch (fewer, larger calls), which beats that prediction on a GPU.

All variants are measured round-robin in one process (``interleaved_samples``), so a noisy
machine disturbs them alike; each variant has its own copies of the networks (same seed) and
its own optimiser. The ratio printed is that of the median step times; next to it are the
quartiles of the per-round ratios (each round's SFT step over the same round's teacher step),
which show how far the machine's noise moves it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Dict, Optional

import torch

from benchmarks.common import (
    add_malloc_option,
    apply_malloc,
    cascade_step,
    default_device,
    interleaved_samples,
    median,
    print_profile,
    round_ratios,
    synthetic_batch,
    training_step,
)
from sftkd_fastmri.cli.options import compile_value

TARGET_RATIO = 1.8


def _sft_step(
    teacher: str,
    student: str,
    inputs,
    target,
    device: str,
    batch_branches: Optional[bool],
    compile: Any = None,
) -> Callable[[], None]:
    from sftkd_fastmri.experiment.runs import compile_network
    from sftkd_fastmri.models import create_model
    from sftkd_fastmri.sft import SFTLoss, StudentFriendlyTeacher

    torch.manual_seed(0)
    sft = StudentFriendlyTeacher(
        create_model(teacher), create_model(student), batch_branches=batch_branches
    )
    sft = sft.to(device).train()
    compile_network(
        sft, compile, announce=False
    )  # as `sft --compile`: the wrapper's training forward
    loss_fn = SFTLoss("l1")
    # S_1 gets no gradient without branch 0 (paper); Adam skips parameters whose grad is None.
    opt = torch.optim.Adam(sft.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(sft(*inputs), target).total.backward()
        opt.step()

    return step


def _batch(args: argparse.Namespace, device: str):
    """``(masked k-space, mask, sens maps)`` and the target of the configured size."""
    masked, mask, sens, target = synthetic_batch(
        args.batch, args.size, args.size, args.coils, device
    )
    return (masked, mask, sens), target


def measure(args: argparse.Namespace, device: str) -> Dict:
    inputs, target = _batch(args, device)
    fns = {
        "teacher": training_step(args.teacher, inputs, target, device),
        "sft": _sft_step(args.teacher, args.student, inputs, target, device, False),
    }
    if not args.no_batch_branches:
        fns["sft_batch_branches"] = _sft_step(
            args.teacher, args.student, inputs, target, device, True
        )
    if args.compile not in (None, False):  # --compile false: eager only
        fns["teacher_compiled"] = training_step(args.teacher, inputs, target, device, args.compile)
        fns["sft_compiled"] = _sft_step(
            args.teacher, args.student, inputs, target, device, False, args.compile
        )
    if not args.no_breakdown:
        fns["teacher_cascade"] = cascade_step(args.teacher, inputs, device)
        fns["student_cascade"] = cascade_step(args.student, inputs, device)
    samples = interleaved_samples(fns, device, warmup=args.warmup, rounds=args.rounds)
    times = {name: median(values) for name, values in samples.items()}
    steps = {k: v for k, v in times.items() if not k.endswith("_cascade")}
    # each SFT variant against the teacher step run the same way (eager, or compiled)
    base = {k: "teacher_compiled" if k.endswith("_compiled") else "teacher" for k in steps}
    ratios = [k for k in steps if not k.startswith("teacher")]
    result = {
        "teacher": args.teacher,
        "student": args.student,
        "batch": args.batch,
        "size": args.size,
        "coils": args.coils,
        "device": device,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "step_s": steps,
        "ratio": {k: steps[k] / steps[base[k]] for k in ratios},
        "round_ratios": {k: round_ratios(samples[k], samples[base[k]]) for k in ratios},
        "compile": args.compile,
        "target_ratio": TARGET_RATIO,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    if not args.no_breakdown:
        # The branches add N(N-1)/2 student cascades to the teacher's N cascades, so from the
        # per-cascade costs alone (loss and Adam ignored):
        n = _num_cascades(args.teacher)
        cost = times["student_cascade"] / times["teacher_cascade"]
        result["cascade_s"] = {
            "teacher": times["teacher_cascade"],
            "student": times["student_cascade"],
        }
        result["student_to_teacher_cascade_cost"] = cost
        result["predicted_ratio"] = 1.0 + n * (n - 1) / 2 * cost / n
        model = cascade_cost_model(
            times["teacher_cascade"],
            times["student_cascade"],
            _depth(args.teacher),
            _depth(args.student),
            n,
            TARGET_RATIO,
        )
        if model is not None:
            result["cascade_cost_model_s"] = model
    if device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    return result


def profile_step(args: argparse.Namespace, device: str) -> None:
    """Print the operators that take the time of one SFT step and one teacher step."""
    inputs, target = _batch(args, device)
    steps = {
        "teacher": training_step(args.teacher, inputs, target, device),
        "sft": _sft_step(args.teacher, args.student, inputs, target, device, None),
    }
    spent = {}
    for name, step in steps.items():
        title = f"{name} steps, batch {args.batch}, {args.size}x{args.size}, {device}"
        spent[name] = print_profile(step, device, title, args.warmup)
    print(profile_summary(spent["teacher"], spent["sft"]))


def profile_summary(teacher: Dict[str, float], sft: Dict[str, float]) -> str:
    """Where the SFT step's extra time goes, in units of the teacher step's profiled time:
    the convolutions (the student cascades' and the teacher's) against everything else (DC,
    wrapper, loss, optimiser)."""
    base = teacher["total"]
    other_t, other_s = base - teacher["convolution"], sft["total"] - sft["convolution"]
    return (
        f"profiled SFT / teacher time {sft['total'] / base:.2f}: convolutions "
        f"{sft['convolution'] / base:.2f} (teacher alone {teacher['convolution'] / base:.2f}), "
        f"everything else {other_s / base:.2f} (teacher alone {other_t / base:.2f}); the "
        f"convolutions take {sft['convolution'] / sft['total']:.0%} of the SFT step and "
        f"{teacher['convolution'] / base:.0%} of the teacher step"
    )


def cascade_cost_model(
    teacher_s: float,
    student_s: float,
    teacher_depth: int,
    student_depth: int,
    n: int,
    target: float,
) -> Optional[Dict[str, Optional[float]]]:
    """Split one cascade's forward and backward into ``fixed + (depth - 2) x per_layer``.

    ``per_layer`` is one more hidden (32 -> 32) convolution with its ReLU; ``fixed`` is what
    does not grow with the depth (the first and last convolutions, a ReLU, the DC, autograd).
    From the two measured cascades of different depth. The SFT ratio is then
    ``1 + (n - 1) / 2 x (fixed + (d_s - 2) per_layer) / (fixed + (d_t - 2) per_layer)``, and
    ``fixed_for_target`` is the largest ``fixed`` for which it reaches ``target`` (same
    ``per_layer``; ``None`` where any ``fixed`` would). ``None`` for equal depths."""
    if teacher_depth == student_depth:
        return None
    per_layer = (teacher_s - student_s) / (teacher_depth - student_depth)
    fixed = student_s - (student_depth - 2) * per_layer
    m, room = (n - 1) / 2, target - 1
    needed = None
    if m > room:
        needed = per_layer * (room * (teacher_depth - 2) - m * (student_depth - 2)) / (m - room)
    return {"fixed": fixed, "per_layer": per_layer, "fixed_for_target": needed}


def _depth(preset: str) -> int:
    from sftkd_fastmri.models import model_config

    return int(model_config(preset)["depth"])


def _num_cascades(preset: str) -> int:
    from sftkd_fastmri.models import model_config

    return int(model_config(preset)["num_cascades"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--teacher", default="dccnn_d5c5", help="teacher preset")
    parser.add_argument("--student", default="dccnn_d3c5", help="student preset")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=320, help="image height and width")
    parser.add_argument("--coils", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="timed round-robin rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--no-batch-branches", action="store_true", help="skip the batch_branches=True variant"
    )
    parser.add_argument(
        "--no-breakdown",
        action="store_true",
        help="skip timing one teacher and one student cascade (the predicted ratio)",
    )
    parser.add_argument(
        "--compile",
        type=compile_value,
        default=None,
        help="also time both steps with the networks torch.compile'd (true: the default "
        "backend, or a backend name), as `train`/`sft --compile` run them; the compiled SFT "
        "step is compared with the compiled teacher step (compilation is in the warm-up)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_malloc_option(parser)
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN pick the fastest convolution algorithms (Trainer(benchmark=True))",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the benchmark, print the most expensive operators of both steps",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = default_device(args.device)
    malloc = apply_malloc(args.malloc, device)
    if args.profile:
        profile_step(args, device)
        return
    result = measure(args, device)
    result["malloc"] = malloc
    if args.json:
        print(json.dumps(result))
        return
    where = result.get("gpu", f"cpu, {result['threads']} threads")
    print(
        f"SFT step vs teacher step: {args.teacher} teacher, {args.student} student, "
        f"batch {args.batch}, {args.size}x{args.size}, {args.coils} coil(s), {device} "
        f"({where}, malloc {malloc}), median of {args.rounds} interleaved rounds"
    )
    times = result["step_s"]
    print(f"  teacher step          {times['teacher'] * 1e3:9.1f} ms")
    if "teacher_compiled" in times:
        print(f"  teacher_compiled      {times['teacher_compiled'] * 1e3:9.1f} ms")
    for name, ratio in result["ratio"].items():
        verdict = "ok" if ratio <= TARGET_RATIO else f"above target {TARGET_RATIO}"
        spread = result["round_ratios"][name]
        print(
            f"  {name:<21} {times[name] * 1e3:9.1f} ms   ratio {ratio:5.2f}  ({verdict}); "
            f"per-round ratios q1 {spread['q1']:.2f}, median {spread['median']:.2f}, "
            f"q3 {spread['q3']:.2f}"
        )
    if "predicted_ratio" in result:
        cascades = result["cascade_s"]
        print(
            f"  one cascade fwd+bwd: teacher {cascades['teacher'] * 1e3:.1f} ms, student "
            f"{cascades['student'] * 1e3:.1f} ms (x{result['student_to_teacher_cascade_cost']:.2f})"
            f" -> ratio predicted from cascade costs {result['predicted_ratio']:.2f}"
        )
    model = result.get("cascade_cost_model_s")
    if model is not None:
        needed = model["fixed_for_target"]
        if needed is None:
            verdict = "the target holds for any fixed part"
        elif needed < 0:
            verdict = "no fixed part meets the target"
        else:
            verdict = f"the target needs fixed <= {needed * 1e3:.1f} ms"
        print(
            f"  cascade = fixed + (depth - 2) x per-layer: fixed {model['fixed'] * 1e3:.1f} ms, "
            f"per layer {model['per_layer'] * 1e3:.1f} ms; {verdict}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
