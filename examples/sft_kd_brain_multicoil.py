"""SFT-KD on the fastMRI brain multi-coil split: SFT teacher, then distillation into D3C5.

    python examples/sft_kd_brain_multicoil.py --data_path /data/fastmri/brain --method at
    python examples/sft_kd_brain_multicoil.py --data-config fastmri_dirs.yaml --dataset brain

Extra flags are passed to both stages (e.g. ``--max-epochs 150 --accelerator gpu``).
"""

import argparse
import sys
from pathlib import Path

from sftkd_fastmri.cli.main import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--method", default="at", help="KD loss (at, fitnet, fsp, sp, cc, imitation)"
    )
    parser.add_argument("--out-dir", default="runs/brain_sftkd")
    args, rest = parser.parse_known_args()
    out = Path(args.out_dir)
    common = ["--challenge", "multicoil", *rest]
    if main(["sft", *common, "--out-dir", str(out / "sft")]) != 0:
        sys.exit(1)
    sys.exit(
        main(
            [
                "distill",
                *common,
                "--out-dir",
                str(out / f"kd_{args.method}"),
                "--teacher-checkpoint",
                str(out / "sft" / "sft_teacher.ckpt"),
                "--init-checkpoint",
                str(out / "sft" / "sft_student_init.ckpt"),
                "--methods",
                f"{args.method}=1",
            ]
        )
    )
