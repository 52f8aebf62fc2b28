"""Shared helpers for the benchmark scripts (synthetic 320 x 320 batches, timing, memory)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import fastmri
import torch
import torch.nn.functional as F


def synthetic_batch(
    batch: int, height: int = 320, width: int = 320, coils: int = 1, device: str = "cpu"
):
    """Masked k-space ``(B, coils, H, W, 2)``, mask, sens maps (or None) and a target."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, height, width, 2, generator=g)
    sens = None
    coil_images = image.unsqueeze(1)
    if coils > 1:
        s = torch.randn(batch, coils, height, width, 2, generator=g)
        sens = s / fastmri.rss_complex(s, dim=1).unsqueeze(1).unsqueeze(-1)
        coil_images = fastmri.complex_mul(image.unsqueeze(1), sens)
    kspace = fastmri.fft2c(coil_images)
    mask = torch.zeros(batch, 1, 1, width, 1, dtype=torch.bool)
    mask[..., ::4, :] = True
    mask[..., width // 2 - 13 : width // 2 + 13, :] = True
    target = fastmri.complex_abs(image)
    out = [kspace * mask, mask, sens, target]
    return [t.to(device) if t is not None else None for t in out]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], None], device: str, warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def interleaved_samples(
    fns: Dict[str, Callable[[], None]], device: str, warmup: int = 2, rounds: int = 5
) -> Dict[str, List[float]]:
    """Seconds of every call of each function, measured round-robin in one run (round ``r`` is
    index ``r`` of every list) so that a noisy shared machine disturbs all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def median(values: List[float]) -> float:
    """The middle value (the upper one of the two middle values for an even count)."""
    return sorted(values)[len(values) // 2]


def interleaved_times(
    fns: Dict[str, Callable[[], None]], device: str, warmup: int = 2, rounds: int = 5
) -> Dict[str, float]:
    """Median seconds per call of each function, measured round-robin in one run so that a
    noisy shared machine disturbs all of them alike (ratios are what the scripts report)."""
    samples = interleaved_samples(fns, device, warmup, rounds)
    return {k: median(v) for k, v in samples.items()}


def round_ratios(numerator: List[float], denominator: List[float]) -> Dict[str, float]:
    """Quartiles of the per-round ratios ``numerator[r] / denominator[r]``.

    Each round times every variant back to back, so a ratio within one round sees one state of
    a shared machine; the spread of these paired ratios across rounds says how far the
    reported ratio of medians can be trusted. Returns ``min``, ``q1``, ``median``, ``q3`` and
    ``max`` of the sorted ratios; the quartiles are the values at ranks ``floor((n - 1) / 4)``
    and ``n - 1`` minus that (symmetric about the median's rank for odd ``n``).
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("round_ratios needs two equally long, non-empty lists of round times")
    ratios = sorted(n / d for n, d in zip(numerator, denominator))
    quarter = (len(ratios) - 1) // 4
    return {
        "min": ratios[0],
        "q1": ratios[quarter],
        "median": median(ratios),
        "q3": ratios[len(ratios) - 1 - quarter],
        "max": ratios[-1],
    }


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_isolated(module: str, args: List[str]) -> Dict:
    """Run ``python -m module args`` in a fresh process and parse its last JSON line, so
    peak-memory figures of one configuration are not inflated by another."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=root
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def default_device(requested: Optional[str]) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_malloc_option(parser) -> None:
    """``--malloc {retain,default}``: the CPU allocator settings the command line uses."""
    parser.add_argument(
        "--malloc",
        choices=("retain", "default"),
        default="retain",
        help="CPU runs: 'retain' keeps freed memory in the process as sftkd-fastmri does "
        "without a GPU (sftkd_fastmri.retain_freed_memory); 'default': glibc's defaults",
    )


def apply_malloc(mode: str, device: str) -> str:
    """Apply ``--malloc`` for a CPU run; returns what is in effect (for the printout)."""
    if device.startswith("cuda"):
        return "n/a"
    if mode == "retain":
        from sftkd_fastmri import retain_freed_memory

        return "retain" if retain_freed_memory() else "default (retain unavailable)"
    return "default"


#: Convolution events: PyTorch's forward and backward, and ``BlockConv2d``'s own autograd
#: function (``models/conv.py``), whose backward computes the weight and bias gradients with
#: matrix products of its own (only its input gradient is an ``aten::convolution_backward``).
#: Only the outermost of nested ones is counted, so nothing is counted twice.
CONVOLUTION_OPS = (
    "aten::convolution",
    "aten::convolution_backward",
    "ConvolutionBackward0",
    "_ShiftedWeightGradConv",
    "_ShiftedWeightGradConvBackward",
)


def _convolution_time(events, cuda: bool) -> float:
    """Microseconds in the outermost :data:`CONVOLUTION_OPS` events of a profile (their
    totals include the kernels and products they call)."""

    def nested(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name in CONVOLUTION_OPS:
                return True
            parent = parent.cpu_parent
        return False

    outermost = [e for e in events if e.name in CONVOLUTION_OPS and not nested(e)]
    if cuda:
        return float(sum(e.device_time_total for e in outermost))
    return float(sum(e.cpu_time_total for e in outermost))


def print_profile(
    step: Callable[[], None], device: str, title: str, warmup: int = 1, rows: int = 15
) -> Dict[str, float]:
    """Profile three calls of ``step`` after ``warmup`` and print the most expensive operators
    (self CUDA time on a GPU, self CPU time otherwise).

    Returns:
        Seconds per call: ``"total"`` (all operators' self time) and ``"convolution"`` (the
        forward and backward convolutions, :data:`CONVOLUTION_OPS`, with what they call,
        ``BlockConv2d``'s weight-gradient products included).
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(max(warmup, 1)):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    cuda = device.startswith("cuda")
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"profile of 3 {title}")
    events = prof.key_averages()
    print(events.table(sort_by=key, row_limit=rows))
    if cuda:
        total = sum(e.self_device_time_total for e in events)
    else:
        total = sum(e.self_cpu_time_total for e in events)
    conv = _convolution_time(prof.events(), cuda)
    return {"total": total / 3e6, "convolution": conv / 3e6}  # microseconds -> s per call


def optimizer_step(model: torch.nn.Module, inputs, target, lr: float = 1e-3) -> Callable[[], None]:
    """One training step of ``model``: forward, L1 against ``target``, backward, Adam."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.l1_loss(model(*inputs), target).backward()
        opt.step()

    return step


def training_step(
    preset: str, inputs, target, device: str = "cpu", compile: Any = None
) -> Callable[[], None]:
    """One training step of a fresh model of ``preset`` (seed 0): forward, L1, backward, Adam.
    ``compile``: as the commands' option (``True``, or a ``torch.compile`` backend name)."""
    from sftkd_fastmri.experiment.runs import compile_network
    from sftkd_fastmri.models import create_model

    torch.manual_seed(0)
    model = create_model(preset).to(device).train()
    compile_network(model, compile, announce=False)
    return optimizer_step(model, inputs, target)


def cascade_step(preset: str, inputs, device: str = "cpu") -> Callable[[], None]:
    """Forward + backward of one cascade (block + DC) of a fresh ``preset`` model (seed 0),
    from its zero-filled image."""
    from sftkd_fastmri.models import create_model

    torch.manual_seed(0)
    model = create_model(preset).to(device).train()
    x0 = model.initial_state(*inputs).detach()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        model.cascade_step(1, x, *inputs).sum().backward()

    return step
