"""SFT-KD on the fastMRI brain multi-coil split: SFT teacher, then distillation into D3C5.

    python examples/sft_kd_brain_multicoil.py --data_path /data/fastmri/brain --method at
    python examples/sft_kd_brain_multicoil.py --data-config fastmri_dirs.yaml --dataset brain

Extra flags are passed to both stages (e.g. ``--max-epochs 150 --accelerator gpu``), so they
must be options both ``sft`` and ``distill`` take; both command lines are checked before the
SFT stage trains. Masks are equispaced (``--mask-type equispaced_fraction``), as fastMRI's
brain data are acquired, unless ``--mask-type`` says otherwise or the output folder holds an
earlier run, whose mask type is kept. Run again with a higher
``--max-epochs`` to train on: when the SFT stage trains on, its exports change, and the
distillation stage is trained again from them (from the start).
"""

import argparse
import json
import sys
from pathlib import Path

from sftkd_fastmri.cli.main import build_parser, main
from sftkd_fastmri.experiment.run_record import recorded_weights_changed
from sftkd_fastmri.kd import available_losses

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="at", help=f"KD loss ({', '.join(available_losses())})")
    # both spellings, as the package's commands accept: an --out_dir left in ``rest`` would
    # reach both stages and be overridden by theirs below
    parser.add_argument("--out-dir", "--out_dir", dest="out_dir", default="runs/brain_sftkd")
    args, rest = parser.parse_known_args()
    if args.method not in available_losses():
        parser.error(f"--method {args.method!r}: available {', '.join(available_losses())}")
    out = Path(args.out_dir)
    sft_dir, kd_dir = out / "sft", out / f"kd_{args.method}"
    common = ["--challenge", "multicoil", *rest]
    if not any(a == "--mask-type" or a.startswith("--mask-type=") for a in rest):
        try:  # an earlier run in this folder goes on with its own masks
            mask_type = json.loads((sft_dir / "run_config.json").read_text())["mask_type"]
        except (OSError, ValueError, KeyError, TypeError):
            mask_type = "equispaced_fraction"
        common = ["--mask-type", str(mask_type), *common]
    inputs = {
        "teacher_checkpoint": str(sft_dir / "sft_teacher.ckpt"),
        "init_checkpoint": str(sft_dir / "sft_student_init.ckpt"),
    }
    sft = ["sft", *common, "--out-dir", str(sft_dir)]
    distill = ["distill", *common, "--out-dir", str(kd_dir), "--methods", f"{args.method}=1"]
    for key, path in inputs.items():
        distill += [f"--{key.replace('_', '-')}", path]
    # argparse errors (an option only one of the commands takes, a typo) before hours of SFT
    for argv in (sft, distill):
        build_parser().parse_args(argv)
    if main(sft) != 0:
        sys.exit(1)
    if any(recorded_weights_changed(inputs, kd_dir, key) for key in inputs):
        print(f"[redo] {kd_dir}: the SFT stage trained on since it ran; distilling again")
        distill += ["--resume", "false"]
    sys.exit(main(distill))
