"""The ``sftkd-fastmri export`` command: one network of any checkpoint, for deployment.

Registered through ``main._EXTRA_COMMANDS``; this module must not import
:mod:`sftkd_fastmri.cli.main` (main imports it).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Callable

from ..export.deploy import (
    DEFAULT_EXAMPLE_SHAPE,
    EXPORT_FORMATS,
    SUFFIXES,
    default_export_path,
    export_model,
    load_torchscript_export,
    recorded_challenge,
)
from ..export.loading import check_role_applies
from .options import ROLE_CHOICES, path_value

__all__ = ["cmd_export", "register"]

HELP = (
    "write a teacher or student alone from any checkpoint (train, SFT, KD) as a model "
    "checkpoint, TorchScript module, torch.export program (pt2) or ONNX file, for deployment"
)


def cmd_export(args: argparse.Namespace) -> int:
    """Export the selected network and say what was written."""
    check_role_applies(args.checkpoint, args.role)
    out = (
        Path(args.out) if args.out else default_export_path(args.checkpoint, args.format, args.role)
    )
    if args.out and out.is_file() and not args.overwrite:
        # the default names are this command's own outputs, replaced as a run trains on; a
        # path the user names may hold anything (another checkpoint)
        raise FileExistsError(
            f"--out {out} exists; pass --overwrite to replace it with this {args.format} export"
        )
    if args.out and not out.name.endswith(SUFFIXES[args.format]):
        warnings.warn(
            f"--out {out.name}: a {args.format} export is usually named *{SUFFIXES[args.format]}",
            stacklevel=2,
        )
    try:
        with warnings.catch_warnings():  # said below, in the command's own words
            warnings.filterwarnings("ignore", message=".*does not record whether its data")
            path = export_model(
                args.checkpoint,
                out,
                format=args.format,
                role=args.role,
                example_shape=args.shape,
                coils=args.coils,
                opset=args.opset,
            )
    except RuntimeError as err:
        # ExportError (e.g. ONNX without complex FFTs) carries a complete explanation.
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.format} export written to {path}")
    if args.format == "torchscript":
        _, meta = load_torchscript_export(path)
        sizes = (
            "any size"
            if meta.get("dynamic_shapes")
            else "only {} x {}".format(*meta.get("example_shape", ("?", "?")))
        )
        how = {"trace": "traced", "script": "scripted"}.get(meta.get("method"), "?")
        print(
            f"  {meta.get('role')} ({meta.get('preset')}), {how}, "
            f"inputs ({', '.join(meta.get('inputs', []))}), {sizes}"
        )
    # the warning export_model gives (filtered above), for every format with a signature
    if args.format != "state_dict" and args.coils is None:
        if recorded_challenge(args.checkpoint) is None:
            print(
                "  the checkpoint does not record its data's challenge: single-coil inputs; "
                "pass --coils N for a multi-coil export"
            )
    return 0


def register(command: Callable[..., argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand through ``build_parser``'s ``command`` helper."""
    p = command("export", cmd_export, HELP)
    p.add_argument(
        "checkpoint",
        metavar="CKPT",
        type=path_value,
        help="model export or Lightning checkpoint of a training, SFT or distillation run "
        "(or of fastMRI's VarNetModule / VarNetModule2)",
    )
    p.add_argument(
        "--format",
        default="torchscript",
        choices=EXPORT_FORMATS,
        help="state_dict: model checkpoint (needs this package to load); torchscript: "
        "self-contained module (default); pt2: torch.export program, TorchScript's successor "
        "(torch.export.load(path).module()); onnx: needs pip install 'sftkd_fastmri[onnx]' "
        "(onnx, onnxscript, onnxruntime)",
    )
    p.add_argument(
        "--role",
        default="auto",
        choices=ROLE_CHOICES,
        help="which network of an SFT checkpoint (auto: the teacher)",
    )
    suffixes = ", ".join(SUFFIXES.values())
    p.add_argument(
        "--out",
        type=path_value,
        help=(
            f"output file (default: next to CKPT, <stem>.<role>{{{suffixes}}} where role is "
            "the SFT network chosen or the role the file records (distill's model.pt: "
            "student); for a network recorded as a plain model (train's model.pt, Lightning "
            "checkpoints) <stem>.ts.pt / .pt2 / .onnx, and <stem>.model.pt as a model "
            "checkpoint)"
        ),
    )
    p.add_argument(
        "--shape",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="k-space size to trace and check the export at (default: the size an earlier "
        "export recorded, else {} x {}; the export's metadata says whether other sizes "
        "work)".format(*DEFAULT_EXAMPLE_SHAPE),
    )
    p.add_argument(
        "--coils",
        type=int,
        default=None,
        help="1: single-coil inputs (kspace, mask); more: multi-coil (kspace, mask, sens_maps), "
        "any coil count (default: from the data the checkpoint was trained on, when it "
        "records it; else 1)",
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out file (the default names are always replaced)",
    )
    return p
