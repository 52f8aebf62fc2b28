"""retain_freed_memory: glibc keeps freed tensors' memory, so a repeated allocation does not
page-fault its memory back in."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

import sftkd_fastmri.allocator as allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

_PROBE = """
import json, resource, sys
import torch
from sftkd_fastmri import create_model, retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
torch.manual_seed(0)
torch.set_num_threads(1)
model = create_model("dccnn_d3c5", num_cascades=2)
opt = torch.optim.Adam(model.parameters())
kspace, mask = torch.randn(4, 1, 288, 288, 2), torch.ones(1, 1, 1, 288, 1, dtype=torch.bool)
faults = []
for _ in range(4):  # training steps; minor page faults of each
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    opt.zero_grad()
    model(kspace, mask).abs().mean().backward()
    opt.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("SFTKD_FASTMRI_MALLOC", None)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_training_steps_reuse_retained_memory_without_page_faults():
    default, retained = _probe("default"), _probe("retain")
    assert default["applied"] is False and retained["applied"] is True
    # The activations (4 x 32 x 288 x 288 float32, 40 MiB) exceed the 32 MiB up to which
    # glibc's adaptive mmap threshold would keep them: with the defaults every step
    # page-faults them back in; with the memory retained, steps after the first reuse it.
    assert min(default["faults"][1:]) > 10000
    assert sum(retained["faults"][1:]) < min(default["faults"][1:]) / 2


def test_opt_out_and_idempotence(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setenv("SFTKD_FASTMRI_MALLOC", "default")
    assert allocator.retain_freed_memory() is False
    monkeypatch.delenv("SFTKD_FASTMRI_MALLOC")
    monkeypatch.setattr(allocator, "_applied", True)  # already applied: no second mallopt

    def no_libc(*args, **kwargs):
        raise AssertionError("libc opened again")

    monkeypatch.setattr(allocator.ctypes, "CDLL", no_libc)
    assert allocator.retain_freed_memory() is True
