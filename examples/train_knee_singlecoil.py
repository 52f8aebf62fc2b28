"""Train a DC-CNN on the fastMRI knee single-coil split (thin wrapper over the library).

    python examples/train_knee_singlecoil.py --data_path /data/fastmri/knee --model dccnn_d5c5
    python examples/train_knee_singlecoil.py --data-config fastmri_dirs.yaml --dataset knee

Every option of ``sftkd-fastmri train`` is accepted (see ``--help``).
"""

import sys

from sftkd_fastmri.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", "--challenge", "singlecoil", *sys.argv[1:]]))
