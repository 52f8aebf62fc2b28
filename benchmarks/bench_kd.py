"""Cost of knowledge distillation per training step, and the teacher's memory during KD.

Usage::

    python -m benchmarks.bench_kd                         # 320 x 320 single-coil, batch 4
    python -m benchmarks.bench_kd --device cuda --batch 8
    python -m benchmarks.bench_kd --methods at imitation all --size 256 --no-memory
    python -m benchmarks.bench_kd --threads 1             # a busy shared CPU machine

Time ratio, per KD method (``at``, ``fitnet``, ``sp``, ``cc``, ``fsp``, ``imitation`` and
``all`` six together, each with weight 1 and its default DC-CNN layer pairing)::

    KD step / (student step + teacher no-grad forward)

* KD step: exactly the path of :class:`~sftkd_fastmri.callbacks.DistillationCallback` -
  :class:`~sftkd_fastmri.kd.distiller.Distiller` hooks record the student's features during its
  forward, the teacher runs on the student's arguments under ``torch.no_grad()``, then
  L1 + weighted KD terms, backward, Adam step.
* Denominator: the unavoidable work - a plain student training step (forward, L1, backward,
  Adam) plus one teacher forward under ``torch.no_grad()``.

So the ratio is the overhead of hooks, KD losses and their backward; target <= 1.1. The
``(control)`` row is the floor without any of that: one step with the teacher forward and an L1
imitation term written by hand (no hooks, no Distiller); above 1 it shows what merely holding
both networks' activations in one step costs on the device (caches, page faults). All steps
are timed round-robin in one process (:func:`benchmarks.common.interleaved_samples`), so a
noisy shared machine disturbs numerator and denominator alike. The ratio reported is that of the
medians; the quartiles of the per-round ratios (each round's KD step over the same round's
student step + teacher forward) show how much the machine's noise moves it.

Memory during KD, per method, each measured in a fresh process
(:func:`benchmarks.common.run_isolated`):

* teacher: its parameters plus the growth of memory from just before its no-grad forward to
  the peak of that forward (its activations and the teacher features held for the KD losses;
  for AT, FSP, SP and CC only their reductions are held, computed in the teacher's hooks, see
  :class:`~sftkd_fastmri.kd.TeacherSummary`);
* step extra: peak of the KD step minus the peak of a student-only step (the teacher plus the
  graph the KD losses add to the student's backward; AT's and FSP's gradients on the student's
  activations are deferred and fused into the backward pass, see
  :mod:`sftkd_fastmri.kd.deferred`, so they hold no full-size gradient per activation).

On CUDA memory is ``torch.cuda.memory_allocated`` / ``max_memory_allocated``; on CPU the
resident set size (Linux VmRSS / VmHWM, the peak reset after the first step so that import-time
peaks do not hide it; blocks >= 256 KiB are mmap-ed by glibc there, ``MALLOC_MMAP_THRESHOLD_``,
so that freed tensors leave the resident set; still coarser than the CUDA figures).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from benchmarks.common import (
    add_malloc_option,
    apply_malloc,
    default_device,
    interleaved_samples,
    median,
    optimizer_step,
    peak_rss_mib,
    print_profile,
    round_ratios,
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
    return optimizer_step(student, inputs, target, lr=1e-4)


def _teacher_forward(teacher: torch.nn.Module, inputs) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            teacher(*inputs)

    return forward


def _kd_step(student, teacher, method: str, inputs, target) -> Callable[[], None]:
    return _kd_setup(student, teacher, method, inputs, target)[0]


def _kd_setup(student, teacher, method: str, inputs, target):
    """A KD training step (the callback's path) and its Distiller."""
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

    return step, distiller


def _control_step(student, teacher, inputs, target) -> Callable[[], None]:
    """Student step with a hand-written teacher forward and L1 imitation term, no hooks."""
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        output = student(*inputs)
        with torch.no_grad():
            teacher_output = teacher(*inputs)
        (F.l1_loss(output, target) + F.l1_loss(output, teacher_output)).backward()
        opt.step()

    return step


def time_methods(args: argparse.Namespace, device: str) -> Dict[str, List[float]]:
    """Seconds of the student step, the teacher forward and each method's KD step, per round."""
    kspace, mask, sens, target = synthetic_batch(args.batch, args.size, args.size, 1, device)
    inputs = (kspace, mask, sens)
    student, teacher = _networks(args.student, args.teacher, device)
    fns: Dict[str, Callable[[], None]] = {
        "student_step": _student_step(copy.deepcopy(student), inputs, target),
        "teacher_forward": _teacher_forward(teacher, inputs),
        "control": _control_step(copy.deepcopy(student), teacher, inputs, target),
    }
    for method in args.methods:
        # Own copies per method: separate hooks and Adam state, same starting weights.
        fns[method] = _kd_step(
            copy.deepcopy(student), copy.deepcopy(teacher), method, inputs, target
        )
    return interleaved_samples(fns, device, warmup=args.warmup, rounds=args.rounds)


def profile_method(args: argparse.Namespace, device: str, method: str) -> None:
    """Print the operators that take the time of a KD step (``torch.profiler``), so a ratio
    above target can be traced to the loss, its backward or the hooks."""
    kspace, mask, sens, target = synthetic_batch(args.batch, args.size, args.size, 1, device)
    inputs = (kspace, mask, sens)
    student, teacher = _networks(args.student, args.teacher, device)
    step = (
        _student_step(student, inputs, target)
        if method == "student"
        else _kd_step(student, teacher, method, inputs, target)
    )
    title = f"{method} steps, {args.size}x{args.size}, batch {args.batch}, {device}"
    print_profile(step, device, title, args.warmup, args.profile_rows)


def _reset_peak(device: str) -> None:
    """Restart the peak-memory count (CUDA allocator peak, or Linux VmHWM via clear_refs)."""
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the resident-set high-water mark
    except OSError:
        pass  # the lifetime peak is read instead (coarser)


def _memory(device: str, peak: bool) -> float:
    """MiB now (``peak=False``) or at the peak since :func:`_reset_peak`."""
    sync(device)
    if device.startswith("cuda"):
        value = torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
        return value / 2**20
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mib()


def peak_memory(args: argparse.Namespace, device: str, method: Optional[str]) -> Dict:
    """Memory (MiB) of training steps, student only (``method=None``) or KD.

    Returns ``peak_mib`` (peak of two steps after a first one that allocates the Adam state;
    import-time peaks are excluded) and, for KD, ``teacher_mib``: the growth of memory from
    just before the teacher forward to its peak (its no-grad activations and the features held
    for the KD losses), plus the teacher's parameters.
    """
    kspace, mask, sens, target = synthetic_batch(args.batch, args.size, args.size, 1, device)
    inputs = (kspace, mask, sens)
    distiller = None
    if method is None:
        from sftkd_fastmri.models import create_model

        torch.manual_seed(0)
        step = _student_step(create_model(args.student).to(device), inputs, target)
    else:
        student, teacher = _networks(args.student, args.teacher, device)
        step, distiller = _kd_setup(student, teacher, method, inputs, target)
    step()
    _reset_peak(device)
    for _ in range(2):
        step()
    result = {"method": method, "peak_mib": _memory(device, peak=True)}
    if distiller is not None:
        run_teacher, seen = distiller.run_teacher, []

        def measured_run_teacher():
            before = _memory(device, peak=False)
            _reset_peak(device)
            output = run_teacher()
            seen.append(_memory(device, peak=True) - before)
            return output

        distiller.run_teacher = measured_run_teacher  # instance attribute: used by forward()
        step()
        params = sum(p.numel() * p.element_size() for p in distiller.teacher.parameters())
        result["teacher_mib"] = seen[0] + params / 2**20
    return result


def _worker_args(args: argparse.Namespace, device: str, method: Optional[str]) -> List[str]:
    out = ["--worker-memory", method or "student", "--device", device]
    out += ["--size", str(args.size), "--batch", str(args.batch)]
    if args.threads is not None:
        out += ["--threads", str(args.threads)]
    if args.cudnn_benchmark:
        out.append("--cudnn-benchmark")
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
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 avoids thread contention on a busy machine",
    )
    add_malloc_option(parser)
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN pick the fastest convolution algorithms (Trainer(benchmark=True))",
    )
    parser.add_argument(
        "--profile",
        metavar="METHOD",
        default=None,
        help="instead of the benchmark, profile the KD step of METHOD (or 'student') and "
        "print its most expensive operators",
    )
    parser.add_argument("--profile-rows", type=int, default=20, help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    parser.add_argument("--worker-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = default_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    if args.worker_memory is not None:
        method = None if args.worker_memory == "student" else args.worker_memory
        print(json.dumps(peak_memory(args, device, method)))
        return

    # Memory workers keep glibc's defaults (and MALLOC_MMAP_THRESHOLD_) so that the resident
    # set follows live tensors; the timing applies the command line's CPU settings.
    malloc = apply_malloc(args.malloc, device)
    if args.profile is not None:
        profile_method(args, device, args.profile)
        return

    samples = time_methods(args, device)
    times = {name: median(values) for name, values in samples.items()}
    base = times["student_step"] + times["teacher_forward"]
    base_rounds = [s + t for s, t in zip(samples["student_step"], samples["teacher_forward"])]
    print(
        f"KD step cost, {args.teacher} -> {args.student}, {args.size}x{args.size} single-coil, "
        f"batch {args.batch}, {device} ({torch.get_num_threads()} CPU threads, malloc "
        f"{malloc}), median of "
        f"{args.rounds} interleaved rounds"
    )
    print(f"student step {times['student_step']:.3f} s, teacher no-grad forward "
          f"{times['teacher_forward']:.3f} s, sum {base:.3f} s")  # fmt: skip
    print(
        f"{'method':<12}{'KD step s':>12}{'ratio':>10}{'<= 1.1':>8}"
        f"{'per-round ratios: q1  median  q3':>36}"
    )

    def row(label: str, name: str, spread: Dict[str, float], verdict: str) -> None:
        print(
            f"{label:<12}{times[name]:>12.3f}{times[name] / base:>10.3f}"
            f"{verdict:>8}{spread['q1']:>20.3f}{spread['median']:>8.3f}{spread['q3']:>8.3f}"
        )

    control = times["control"] / base
    control_rounds = round_ratios(samples["control"], base_rounds)
    row("(control)", "control", control_rounds, "")
    rows = []
    for method in args.methods:
        ratio = times[method] / base
        spread = round_ratios(samples[method], base_rounds)
        rows.append(
            {"method": method, "kd_step_s": times[method], "ratio": ratio, "round_ratios": spread}
        )
        row(method, method, spread, "yes" if ratio <= 1.1 else "NO")
    print(
        "ratio: median KD step / (median student step + median teacher forward); per-round "
        "ratios: the same within each round, their quartiles across rounds"
    )
    result = {
        "device": device,
        "size": args.size,
        "batch": args.batch,
        "malloc": malloc,
        "student_step_s": times["student_step"],
        "teacher_forward_s": times["teacher_forward"],
        "control_ratio": control,
        "control_round_ratios": control_rounds,
        "rounds": args.rounds,
        "methods": rows,
    }
    if not args.no_memory:
        kind = "max_memory_allocated" if device.startswith("cuda") else "peak RSS"
        # glibc serves blocks >= this size with mmap and unmaps them on free, so the resident
        # set follows live tensors (not the allocator's cache) in the memory processes.
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(256 * 1024))
        student_only = run_isolated("benchmarks.bench_kd", _worker_args(args, device, None))
        print(
            f"memory during KD ({kind}, one fresh process per row; student-only step peak "
            f"{student_only['peak_mib']:.0f} MiB)"
        )
        print(f"{'method':<12}{'teacher MiB':>14}{'step extra MiB':>16}")
        memory = {
            "kind": kind,
            "student_only_peak_mib": student_only["peak_mib"],
            "teacher_mib": {},
            "step_extra_mib": {},
        }
        for method in args.methods:
            kd = run_isolated("benchmarks.bench_kd", _worker_args(args, device, method))
            extra = kd["peak_mib"] - student_only["peak_mib"]
            memory["teacher_mib"][method] = kd["teacher_mib"]
            memory["step_extra_mib"][method] = extra
            print(f"{method:<12}{kd['teacher_mib']:>14.0f}{extra:>16.0f}")
        print(
            "teacher MiB: parameters + growth during the teacher's no-grad forward (its "
            "activations and the features held for the losses); step extra MiB: peak of the KD "
            "step minus that of the student-only step (teacher + KD-loss graph)"
        )
        result["memory"] = memory
    print(json.dumps(result))


if __name__ == "__main__":
    main()
