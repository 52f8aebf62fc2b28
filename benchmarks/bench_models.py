"""Training throughput (slices/s) and peak memory of the DC-CNN presets.

Usage::

    python -m benchmarks.bench_models                 # D5C5 and D3C5, 320 x 320 single-coil
    python -m benchmarks.bench_models --presets dccnn_d5c5_paper dccnn_d3c5_paper --batch 4

CPU runs keep freed memory in the process as ``sftkd-fastmri`` does (``--malloc default`` for
glibc's defaults). Each preset is measured in its own process (peak memory is per process:
the resident-set peak on CPU, ``torch.cuda.max_memory_allocated`` on GPU), one training step
= forward, L1 loss, backward, Adam step. Throughput is batch / median step time.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common import (
    add_malloc_option,
    apply_malloc,
    default_device,
    peak_rss_mib,
    run_isolated,
    synthetic_batch,
    time_call,
)


def measure(preset: str, batch: int, size: int, coils: int, device: str, repeats: int) -> dict:
    from sftkd_fastmri.models import create_model

    model = create_model(preset).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    masked, mask, sens, target = synthetic_batch(batch, size, size, coils, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = peak_rss_mib()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.l1_loss(model(masked, mask, sens), target)
        loss.backward()
        opt.step()

    seconds = time_call(step, device, warmup=2, repeats=repeats)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_mib() - base  # growth of the process peak during training steps
    return {
        "preset": preset,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "size": size,
        "coils": coils,
        "device": device,
        "step_s": seconds,
        "slices_per_s": batch / seconds,
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
        row = measure(args.presets[0], args.batch, args.size, args.coils, device, args.repeats)
        print(json.dumps(dict(row, malloc=malloc)))
        return
    rows = []
    for preset in args.presets:
        rows.append(
            run_isolated(
                "benchmarks.bench_models",
                [
                    "--worker",
                    "--presets",
                    preset,
                    "--batch",
                    str(args.batch),
                    "--size",
                    str(args.size),
                    "--coils",
                    str(args.coils),
                    "--repeats",
                    str(args.repeats),
                    "--device",
                    device,
                    "--malloc",
                    args.malloc,
                ],
            )
        )
    print(
        f"DC-CNN training step, {args.size}x{args.size}, coils={args.coils}, "
        f"batch {args.batch}, {device} (malloc {rows[0].get('malloc', 'n/a')})"
    )
    print(f"{'preset':<20}{'params':>10}{'step s':>10}{'slices/s':>10}{'peak MiB':>10}")
    for r in rows:
        print(
            f"{r['preset']:<20}{r['params']:>10,}{r['step_s']:>10.3f}{r['slices_per_s']:>10.2f}{r['peak_mib']:>10.0f}"
        )
    if len(rows) == 2:
        print(
            f"throughput ratio {rows[1]['preset']} / {rows[0]['preset']}: "
            f"{rows[1]['slices_per_s'] / rows[0]['slices_per_s']:.2f}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
