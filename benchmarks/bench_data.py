"""Cost of the data transform per slice, the CPU work every DataLoader worker does.

Usage::

    python -m benchmarks.bench_data                       # knee 1- and 15-coil, brain 16-coil
    python -m benchmarks.bench_data --rounds 20 --cases knee_15

For each case, a synthetic fastMRI slice of the real size (k-space 640 x W with readout
oversampling, a 320 x 320 target, a 4x random mask with 8 % centre) goes through

* ``transform``: :class:`~sftkd_fastmri.data.DCCNNDataTransform` (readout crop along H only,
  inverse transforms on acquired columns only, native complex arithmetic);
* ``reference``: the same steps written plainly with fastMRI's own functions
  (``to_tensor``, 2-D ``ifft2c`` / ``fft2c`` for the readout crop, ``apply_mask``, ACS maps
  from ``ifft2c`` and ``rss_complex``, ``complex_mul`` with ``complex_conj`` for the coil
  combination, ``complex_abs``, ``center_crop``), which is what the transform computed before.

Both give the same sample (checked here on every case, and against fastMRI's definitions in
``tests/data/test_transforms.py``). Times are per slice on one thread, as in a DataLoader
worker (PyTorch runs workers single-threaded), medians of interleaved rounds
(:func:`benchmarks.common.interleaved_times`), CPU allocator settings as the command line
uses them (``--malloc``). ``slices/s per worker`` = 1 / time; a GPU step that consumes more
slices per second than the workers produce waits for data.
"""

from __future__ import annotations

import argparse
import json
from typing import Dict

import fastmri
import numpy as np
import torch
from fastmri.data.transforms import apply_mask, center_crop, to_tensor

from benchmarks.common import add_malloc_option, apply_malloc, interleaved_times

CASES = {  # name: (coils, k-space width); k-space height 640, target 320 x 320
    "knee_1": (1, 368),
    "knee_15": (15, 368),
    "brain_16": (16, 320),
}


def _slice(coils: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (640, width) if coils == 1 else (coils, 640, width)
    kspace = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    target = rng.random((320, 320)).astype(np.float32)
    pad = max(0, (width - 330) // 2)  # knee: a few zero-padded columns on each side
    attrs = {"max": 1.0, "padding_left": pad, "padding_right": width - pad}
    return kspace, target, attrs


def _mask_func():
    from sftkd_fastmri.data import create_mask_func

    return create_mask_func("random", [0.08], [4])


def reference(kspace, target, attrs, mask_func, seed):
    """The transform's steps with fastMRI's functions, returning the same sample fields."""
    k = to_tensor(kspace).float()
    if k.dim() == 3:
        k = k.unsqueeze(0)
    height = target.shape[0]
    image = fastmri.ifft2c(k)
    top = (k.shape[-3] - height) // 2
    k = fastmri.fft2c(image[:, top : top + height])
    masked, mask, num_low = apply_mask(
        k, mask_func, seed=seed, padding=(attrs["padding_left"], attrs["padding_right"])
    )
    coil_images = fastmri.ifft2c(masked)
    if masked.shape[0] > 1:
        start = (masked.shape[-2] - num_low + 1) // 2
        acs = torch.zeros_like(masked)
        acs[..., start : start + num_low, :] = masked[..., start : start + num_low, :]
        low = fastmri.ifft2c(acs * mask)
        rss = fastmri.rss_complex(low, dim=0)
        sens = low / rss.clamp_min(1e-6 * rss.max()).unsqueeze(0).unsqueeze(-1)
        combined = fastmri.complex_mul(coil_images, fastmri.complex_conj(sens)).sum(0)
    else:
        sens, combined = torch.zeros(0), coil_images[0]
    zero_filled = center_crop(fastmri.complex_abs(combined), tuple(target.shape))
    scale = zero_filled.max()
    return masked / scale, sens, zero_filled / scale, to_tensor(target) / scale


def measure(args: argparse.Namespace) -> Dict:
    from sftkd_fastmri.data import DCCNNDataTransform

    torch.set_num_threads(1)  # as in a DataLoader worker
    rows = []
    for name in args.cases:
        coils, width = CASES[name]
        kspace, target, attrs = _slice(coils, width)
        transform = DCCNNDataTransform(_mask_func(), training=False, seed=0)
        mask_func = _mask_func()
        seed = transform._mask_seed("bench.h5")
        sample = transform(kspace, None, target, attrs, "bench.h5", 0)
        masked, sens, zero_filled, target_t = reference(kspace, target, attrs, mask_func, seed)
        difference = max(
            float((sample.masked_kspace - masked).abs().max()),
            float((sample.zero_filled - zero_filled).abs().max()),
            float((sample.target - target_t).abs().max()),
            float((sample.sens_maps - sens).abs().max()) if coils > 1 else 0.0,
        )
        times = interleaved_times(
            {
                "transform": lambda t=transform, k=kspace, y=target, a=attrs: t(
                    k, None, y, a, "bench.h5", 0
                ),
                "reference": lambda k=kspace, y=target, a=attrs, m=mask_func, s=seed: reference(
                    k, y, a, m, s
                ),
            },
            "cpu",
            warmup=args.warmup,
            rounds=args.rounds,
        )
        rows.append(
            {
                "case": name,
                "coils": coils,
                "kspace": [640, width],
                "transform_ms": times["transform"] * 1e3,
                "reference_ms": times["reference"] * 1e3,
                "speedup": times["reference"] / times["transform"],
                "slices_per_s_per_worker": 1.0 / times["transform"],
                "max_abs_difference": difference,
            }
        )
    return {"rows": rows, "rounds": args.rounds, "threads": 1}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    add_malloc_option(parser)
    args = parser.parse_args()
    malloc = apply_malloc(args.malloc, "cpu")
    result = measure(args)
    result["malloc"] = malloc
    print(
        f"data transform per slice, 1 thread (a DataLoader worker), malloc {malloc}, "
        f"median of {args.rounds} interleaved rounds"
    )
    print(
        f"{'case':<10}{'k-space':>16}{'transform ms':>14}{'reference ms':>14}{'speedup':>9}"
        f"{'slices/s/worker':>17}"
    )
    for r in result["rows"]:
        shape = f"{r['coils']}x{r['kspace'][0]}x{r['kspace'][1]}"
        print(
            f"{r['case']:<10}{shape:>16}{r['transform_ms']:>14.1f}{r['reference_ms']:>14.1f}"
            f"{r['speedup']:>9.2f}{r['slices_per_s_per_worker']:>17.1f}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
