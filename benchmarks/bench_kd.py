"""Cost of knowledge distillation per training step, and the teacher's memory during KD.

Usage::

    python -m benchmarks.bench_kd                         # 320 x 320 single-coil, batch 4
    python -m benchmarks.bench_kd --device cuda --batch 8
    python -m benchmarks.bench_kd --methods at imitation all --size 256 --no-memory

Time ratio, per KD method (``at``, ``fitnet``, ``sp``, ``cc``, ``fsp``, ``imitation`` and
``all`` six together, each with weight 1 and its default DC-CNN layer pairing)::

    KD step / (student step + teacher no-grad forward)

* KD step: exactly the path of :class:`~sftkd_fastmri.callbacks.DistillationCallback` -
  :class:`~sftkd_fastmri.kd.distiller.Distiller` hooks record the student's features during its
  forward, the teacher runs on the student's arguments under ``torch.no_grad()``, then
  L1 + weighted KD terms, backward, Adam step.
* Denominator: the unavoidable work - a plain student training step (forward, L1, backward,
  Adam) plus one teacher forward under ``torch.no_grad()``.

So the ratio is the overhead of hooks, KD losses and their backward; target <= 1.1. All steps
are timed round-robin in one process (:func:`benchmarks.common.interleaved_times`), so a noisy
shared machine disturbs numerator and denominator alike.

Teacher memory during KD, per method = peak(KD step) - peak(student step, no teacher), each
measured in a fresh process (:func:`benchmarks.common.run_isolated`): the teacher's parameters,
its no-grad activations and the teacher features held for the KD losses (the student's features
are tensors its backward keeps anyway). On CUDA the peak is ``torch.cuda.max_memory_allocated``;
on CPU the peak resident set size (Linux VmHWM, reset after the first step so that import-time
peaks do not hide it; coarser: it includes allocator caching).
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from benchmarks.common import (
    default_device,
    interleaved_times,
    peak_rss_mib,
    run_isolated,
    sync,
    synthetic_batch,
)

METHODS = ("at", "fitnet", "sp", "cc", "fsp", "imitation")


def _losses(method: str) -> Dict[str, float]:
    return dict.fromkeys(METHODS, 1.0) if method == "all" else {method: 1.0}


def _networks(student_preset: str, teacher_preset: str, device: str):
    from sftkd_fastmri.models import create_model

    torch.manual_seed(0)
    return create_model(student_preset).to(device), create_model(teacher_preset).to(device)


def _student_step(student: torch.nn.Module, inputs, target) -> Callable[[], None]:
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.l1_loss(student(*inputs), target).backward()
        opt.step()

    return step


def _teacher_forward(teacher: torch.nn.Module, inputs) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            teacher(*inputs)

    return forward


def _kd_step(student, teacher, method: str, inputs, target) -> Callable[[], None]:
    from sftkd_fastmri.kd.distiller import Distiller

    distiller = Distiller(student, teacher, _losses(method)).to(inputs[0].device).attach()
    opt = torch.optim.Adam([*student.parameters(), *distiller.parameters()], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with distiller.step():
            output = student(*inputs)
            kd = distiller()
        (F.l1_loss(output, target) + kd.total).backward()
        opt.step()

    return step


def time_methods(args: argparse.Namespace, device: str) -> Dict[str, float]:
    """Median seconds of the student step, the teacher forward and each method's KD step."""
    kspace, mask, sens, target = synthetic_batch(args.batch, args.size, args.size, 1, device)
    inputs = (kspace, mask, sens)
    student, teacher = _networks(args.student, args.teacher, device)
    fns: Dict[str, Callable[[], None]] = {
        "student_step": _student_step(copy.deepcopy(student), inputs, target),
        "teacher_forward": _teacher_forward(teacher, inputs),
    }
    for method in args.methods:
        # Own copies per method: separate hooks and Adam state, same starting weights.
        fns[method] = _kd_step(
            copy.deepcopy(student), copy.deepcopy(teacher), method, inputs, target
        )
    return interleaved_times(fns, device, warmup=args.warmup, rounds=args.rounds)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the resident-set high-water mark
        return True
    except OSError:
        return False


def _peak_rss_since_reset() -> float:
    """VmHWM in MiB (the peak since :func:`_reset_peak_rss`), else the lifetime peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mib()


def peak_memory(args: argparse.Namespace, device: str, method: Optional[str]) -> Dict:
    """Peak memory (MiB) of training steps: student only (``method=None``) or KD."""
    kspace, mask, sens, target = synthetic_batch(args.batch, args.size, args.size, 1, device)
    inputs = (kspace, mask, sens)
    if method is None:
        from sftkd_fastmri.models import create_model

        torch.manual_seed(0)
        step = _student_step(create_model(args.student).to(device), inputs, target)
    else:
        student, teacher = _networks(args.student, args.teacher, device)
        step = _kd_step(student, teacher, method, inputs, target)
    step()  # first step allocates the Adam state
    sync(device)
    # Import-time peaks (hundreds of MiB) would hide the step's own; start the count here.
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    for _ in range(2):
        step()
    sync(device)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _peak_rss_since_reset()
    return {"method": method, "peak_mib": peak}


def _worker_args(args: argparse.Namespace, device: str, method: Optional[str]) -> List[str]:
    out = ["--worker-memory", method or "student", "--device", device]
    out += ["--size", str(args.size), "--batch", str(args.batch)]
    return out + ["--student", args.student, "--teacher", args.teacher]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size", type=int, default=320, help="image height = width")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--methods", nargs="+", default=[*METHODS, "all"], choices=[*METHODS, "all"]
    )
    parser.add_argument("--student", default="dccnn_d3c5")
    parser.add_argument("--teacher", default="dccnn_d5c5")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--rounds", type=int, default=5, help="timed round-robin rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    parser.add_argument("--worker-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = default_device(args.device)

    if args.worker_memory is not None:
        method = None if args.worker_memory == "student" else args.worker_memory
        print(json.dumps(peak_memory(args, device, method)))
        return

    times = time_methods(args, device)
    base = times["student_step"] + times["teacher_forward"]
    print(
        f"KD step cost, {args.teacher} -> {args.student}, {args.size}x{args.size} single-coil, "
        f"batch {args.batch}, {device}, median of {args.rounds} interleaved rounds"
    )
    print(f"student step {times['student_step']:.3f} s, teacher no-grad forward "
          f"{times['teacher_forward']:.3f} s, sum {base:.3f} s")  # fmt: skip
    print(f"{'method':<12}{'KD step s':>12}{'ratio':>10}{'<= 1.1':>8}")
    rows = []
    for method in args.methods:
        ratio = times[method] / base
        rows.append({"method": method, "kd_step_s": times[method], "ratio": ratio})
        print(
            f"{method:<12}{times[method]:>12.3f}{ratio:>10.3f}{'yes' if ratio <= 1.1 else 'NO':>8}"
        )
    result = {
        "device": device,
        "size": args.size,
        "batch": args.batch,
        "student_step_s": times["student_step"],
        "teacher_forward_s": times["teacher_forward"],
        "methods": rows,
    }
    if not args.no_memory:
        kind = "max_memory_allocated" if device.startswith("cuda") else "peak RSS"
        student_only = run_isolated("benchmarks.bench_kd", _worker_args(args, device, None))
        from sftkd_fastmri.models import create_model

        params = sum(p.numel() * p.element_size() for p in create_model(args.teacher).parameters())
        print(
            f"teacher memory during KD ({kind} of a KD step minus that of a student-only step, "
            f"isolated processes; student-only peak {student_only['peak_mib']:.0f} MiB; "
            f"teacher parameters alone {params / 2**20:.2f} MiB)"
        )
        memory = {
            "kind": kind,
            "student_only_peak_mib": student_only["peak_mib"],
            "teacher_params_mib": params / 2**20,
            "teacher_mib": {},
        }
        for method in args.methods:
            kd_peak = run_isolated("benchmarks.bench_kd", _worker_args(args, device, method))
            extra = kd_peak["peak_mib"] - student_only["peak_mib"]
            memory["teacher_mib"][method] = extra
            print(f"  {method:<12}{extra:>8.0f} MiB")
        result["memory"] = memory
    print(json.dumps(result))


if __name__ == "__main__":
    main()
