"""Cost of scanning a split folder before the first batch, with and without the header cache.

Usage::

    python -m benchmarks.bench_scan                  # 200 multi-coil volumes
    python -m benchmarks.bench_scan --volumes 1000 --rounds 5

Writes a split of ``--volumes`` small multi-coil volumes (copies of eight demo volumes) into a
temporary folder, then
times, round-robin in one run (:func:`benchmarks.common.interleaved_samples`):

* ``scan``: :class:`~sftkd_fastmri.data.CheckedSliceDataset` reading every volume: it opens
  each file to check its datasets and fastMRI parses its ``ismrmrd_header``;
* ``cached``: the same with ``header_cache=True`` after a first scan filled the cache
  (:mod:`sftkd_fastmri.data.header_cache`): one ``stat`` per file, no file opened.

The files are in the page cache here, so ``scan`` is the CPU cost of opening and parsing; on a
network file system every open also waits for the server, which the cache saves too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from benchmarks.common import interleaved_samples, median, round_ratios


def measure(volumes: int, rounds: int, warmup: int) -> dict:
    from sftkd_fastmri.data import CheckedSliceDataset
    from sftkd_fastmri.data.demo import write_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_demo_data(
            root,
            seed=0,
            image_size=(32, 24),
            num_coils=4,
            volumes_per_split={"train": 8, "val": 1, "test": 1},
            slices_per_volume=2,
            challenges=("multicoil",),
            backend="phantom",
            progress=False,
        )
        # copies of the eight volumes, each its own file
        originals = sorted((root / "multicoil_train").iterdir())
        folder = root / "split"
        folder.mkdir()
        for i in range(volumes):
            shutil.copy(originals[i % len(originals)], folder / f"volume_{i:05d}.h5")
        os.environ["SFTKD_FASTMRI_CACHE_DIR"] = str(Path(tmp) / "cache")
        fns = {
            "scan": lambda: CheckedSliceDataset(folder, "multicoil"),
            "cached": lambda: CheckedSliceDataset(folder, "multicoil", header_cache=True),
        }
        samples = interleaved_samples(fns, "cpu", warmup=warmup, rounds=rounds)
        slices = len(CheckedSliceDataset(folder, "multicoil", header_cache=True))
    times = {k: median(v) for k, v in samples.items()}
    return {
        "volumes": volumes,
        "slices": slices,
        "rounds": rounds,
        "scan_s": times["scan"],
        "cached_s": times["cached"],
        "ms_per_volume": {k: v / volumes * 1e3 for k, v in times.items()},
        "speedup": times["scan"] / times["cached"],
        "round_speedups": round_ratios(samples["scan"], samples["cached"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--volumes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed scans of each kind")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args()
    result = measure(args.volumes, args.rounds, args.warmup)
    if not args.json:
        per = result["ms_per_volume"]
        spread = result["round_speedups"]
        print(
            f"scanning {args.volumes} volumes, median of {args.rounds} interleaved rounds: "
            f"read {per['scan']:.2f} ms per volume, cached {per['cached']:.3f} ms per volume, "
            f"{result['speedup']:.1f}x faster (per round q1 {spread['q1']:.1f}, "
            f"q3 {spread['q3']:.1f})"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
