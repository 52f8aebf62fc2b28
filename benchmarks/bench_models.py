"""Training throughput (slices/s) and peak memory of the DC-CNN presets.

Usage::

    python -m benchmarks.bench_models                 # D5C5 and D3C5, 320 x 320 single-coil
    python -m benchmarks.bench_models --presets dccnn_d5c5_paper dccnn_d3c5_paper --batch 4

One training step = forward, L1 loss, backward, Adam step. Throughput: the presets' steps are
timed round-robin in one process (``interleaved_samples``), so the throughput ratio sees one
state of a shared machine; throughput is batch / median step time. Peak memory: each preset
in its own process (a peak is per process), as the growth during training steps above what
the model, optimiser and batch already hold: of the resident-set peak on CPU, of
``torch.cuda.max_memory_allocated`` on GPU. CPU runs keep freed memory in the process as
``sftkd-fastmri`` does (``--malloc default`` for glibc's defaults).
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common import (
    add_malloc_option,
    apply_malloc,
    default_device,
    interleaved_samples,
    median,
    peak_rss_mib,
    round_ratios,
    run_isolated,
    synthetic_batch,
)


def _step(preset: str, batch: int, size: int, coils: int, device: str):
    """A fresh model of ``preset`` (seed 0) and its training step; the model."""
    from sftkd_fastmri.models import create_model

    torch.manual_seed(0)
    model = create_model(preset).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    masked, mask, sens, target = synthetic_batch(batch, size, size, coils, device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.l1_loss(model(masked, mask, sens), target)
        loss.backward()
        opt.step()

    return step, model


def peak_growth(preset: str, batch: int, size: int, coils: int, device: str) -> dict:
    """MiB the training steps add at their peak above the model, optimiser and batch (one
    preset per process: a peak is per process)."""
    step, model = _step(preset, batch, size, coils, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = peak_rss_mib()
    for _ in range(3):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = peak_rss_mib() - base  # growth of the process peak during training steps
    return {
        "preset": preset,
        "params": sum(p.numel() for p in model.parameters()),
        "peak_mib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["dccnn_d5c5", "dccnn_d3c5"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--coils", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None)
    add_malloc_option(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = default_device(args.device)
    if args.worker:
        malloc = apply_malloc(args.malloc, device)
        row = peak_growth(args.presets[0], args.batch, args.size, args.coils, device)
        print(json.dumps(dict(row, malloc=malloc)))
        return
    memory = {}
    for preset in args.presets:
        flags = ["--worker", "--presets", preset, "--batch", str(args.batch)]
        flags += ["--size", str(args.size), "--coils", str(args.coils), "--device", device]
        memory[preset] = run_isolated("benchmarks.bench_models", [*flags, "--malloc", args.malloc])
    malloc = apply_malloc(args.malloc, device)
    steps = {p: _step(p, args.batch, args.size, args.coils, device)[0] for p in args.presets}
    samples = interleaved_samples(steps, device, warmup=2, rounds=args.repeats)
    rows = []
    for preset in args.presets:
        seconds = median(samples[preset])
        rows.append(
            dict(
                memory[preset],
                batch=args.batch,
                size=args.size,
                coils=args.coils,
                device=device,
                step_s=seconds,
                slices_per_s=args.batch / seconds,
                malloc=malloc,
            )
        )
    print(
        f"DC-CNN training step, {args.size}x{args.size}, coils={args.coils}, "
        f"batch {args.batch}, {device} (malloc {malloc}), median of {args.repeats} "
        "interleaved rounds"
    )
    print(f"{'preset':<20}{'params':>10}{'step s':>10}{'slices/s':>10}{'peak +MiB':>11}")
    for r in rows:
        print(
            f"{r['preset']:<20}{r['params']:>10,}{r['step_s']:>10.3f}{r['slices_per_s']:>10.2f}"
            f"{r['peak_mib']:>+11.0f}"
        )
    if len(rows) == 2:
        print(
            f"throughput ratio {rows[1]['preset']} / {rows[0]['preset']}: "
            f"{rows[1]['slices_per_s'] / rows[0]['slices_per_s']:.2f}; per-round ratios "
            + _quartiles(samples[rows[0]["preset"]], samples[rows[1]["preset"]])
        )
    print(json.dumps(rows))


def _quartiles(first, second) -> str:
    ratios = round_ratios(first, second)  # step of the first over the second: throughput ratio
    return " / ".join(f"{ratios[k]:.2f}" for k in ("q1", "median", "q3")) + " (q1 / median / q3)"


if __name__ == "__main__":
    main()
