"""The benchmark scripts run end to end (tiny sizes) and report what their names say."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_sft_reports_ratios_and_the_cascade_prediction():
    out = _run(
        "benchmarks.bench_sft",
        *("--size", "32", "--batch", "2", "--rounds", "1", "--warmup", "1", "--threads", "1"),
        "--json",
    )
    assert out["device"] == "cpu" and out["malloc"] in ("retain", "default (retain unavailable)")
    assert set(out["ratio"]) == {"sft", "sft_batch_branches"}
    for name, ratio in out["ratio"].items():
        assert ratio == pytest.approx(out["step_s"][name] / out["step_s"]["teacher"])
        assert ratio > 1  # the SFT step does the teacher's work and more
        # One round: its paired ratio is the ratio of the (single-sample) medians.
        assert list(out["round_ratios"][name].values()) == [pytest.approx(ratio)] * 5
    cost = out["student_to_teacher_cascade_cost"]
    assert 0 < cost and out["predicted_ratio"] == pytest.approx(1 + 2 * cost)  # N = 5
    model, cascades = out["cascade_cost_model_s"], out["cascade_s"]
    for depth, name in ((5, "teacher"), (3, "student")):  # D5C5, D3C5
        assert model["fixed"] + (depth - 2) * model["per_layer"] == pytest.approx(cascades[name])


def test_bench_sft_compares_the_compiled_steps_with_each_other():
    out = _run(
        "benchmarks.bench_sft",
        *("--size", "32", "--batch", "2", "--rounds", "1", "--warmup", "1", "--threads", "1"),
        *("--compile", "aot_eager", "--no-batch-branches", "--no-breakdown", "--json"),
    )
    assert out["compile"] == "aot_eager" and set(out["ratio"]) == {"sft", "sft_compiled"}
    steps = out["step_s"]
    assert out["ratio"]["sft_compiled"] == pytest.approx(
        steps["sft_compiled"] / steps["teacher_compiled"]
    )
    assert out["ratio"]["sft"] == pytest.approx(steps["sft"] / steps["teacher"])


def test_bench_scan_times_the_scan_with_and_without_the_header_cache():
    out = _run("benchmarks.bench_scan", "--volumes", "12", "--rounds", "1", "--json")
    assert out["volumes"] == 12 and out["slices"] == 24  # two slices per copied volume
    assert out["speedup"] == pytest.approx(out["scan_s"] / out["cached_s"])
    assert out["ms_per_volume"]["scan"] == pytest.approx(out["scan_s"] / 12 * 1e3)


def test_the_cascade_cost_model_gives_the_fixed_cost_the_target_allows():
    from benchmarks.bench_sft import cascade_cost_model

    # fixed 103 ms, 179 ms per layer: D5 = 103 + 3 * 179, D3 = 103 + 179
    model = cascade_cost_model(0.103 + 3 * 0.179, 0.103 + 0.179, 5, 3, 5, 1.8)
    assert model["fixed"] == pytest.approx(0.103) and model["per_layer"] == pytest.approx(0.179)
    needed = model["fixed_for_target"]
    assert needed == pytest.approx(0.179 / 3)  # 2 (c + k) / (c + 3 k) <= 0.8  <=>  c <= k / 3
    ratio = 1 + 2 * (needed + 0.179) / (needed + 3 * 0.179)
    assert ratio == pytest.approx(1.8)
    assert cascade_cost_model(0.5, 0.5, 5, 5, 5, 1.8) is None  # equal depths: no split
    assert cascade_cost_model(0.6, 0.3, 5, 3, 5, 3.5)["fixed_for_target"] is None  # any c does


def test_bench_kd_reports_ratios_and_memory():
    tiny = ("--size", "32", "--batch", "2", "--rounds", "1", "--warmup", "1", "--threads", "1")
    out = _run("benchmarks.bench_kd", *tiny, "--methods", "at", "fsp", "--malloc", "default")
    base = out["student_step_s"] + out["teacher_forward_s"]
    assert [m["method"] for m in out["methods"]] == ["at", "fsp"]
    for row in out["methods"]:
        assert row["ratio"] == pytest.approx(row["kd_step_s"] / base)
        assert list(row["round_ratios"].values()) == [pytest.approx(row["ratio"])] * 5  # 1 round
    assert out["rounds"] == 1
    memory = out["memory"]
    assert memory["kind"] == "peak RSS" and memory["student_only_peak_mib"] > 0
    assert set(memory["teacher_mib"]) == {"at", "fsp"}
    assert all(v > 0 for v in memory["teacher_mib"].values())  # at least the parameters


def test_bench_models_reports_throughput_of_each_preset():
    tiny = ("--size", "32", "--batch", "2", "--repeats", "1")
    rows = _run("benchmarks.bench_models", *tiny, "--presets", "dccnn_d3c5", "dccnn_d5c5")
    assert [r["preset"] for r in rows] == ["dccnn_d3c5", "dccnn_d5c5"]
    for row in rows:
        assert row["malloc"] in ("retain", "default (retain unavailable)")
        assert row["slices_per_s"] == pytest.approx(row["batch"] / row["step_s"])
    assert rows[0]["params"] == 52_170 and rows[1]["params"] == 144_650


def test_bench_data_times_the_transform_against_fastmris_plain_steps():
    out = _run("benchmarks.bench_data", "--cases", "knee_1", "--rounds", "1", "--warmup", "0")
    (row,) = out["rows"]
    assert row["case"] == "knee_1" and row["kspace"] == [640, 368]
    assert row["speedup"] == pytest.approx(row["reference_ms"] / row["transform_ms"])
    assert row["max_abs_difference"] < 1e-5  # both compute the same sample


def test_bench_sft_profile_splits_the_step_into_convolutions_and_the_rest():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_sft", "--profile", "--warmup", "1"]
        + ["--size", "32", "--batch", "2", "--threads", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    found = re.fullmatch(
        r"profiled SFT / teacher time ([\d.]+): convolutions ([\d.]+) \(teacher alone "
        r"([\d.]+)\), everything else ([\d.]+) \(teacher alone ([\d.]+)\); .*",
        last,
    )
    assert found, last
    ratio, conv, conv_t, other, other_t = map(float, found.groups())
    assert conv + other == pytest.approx(ratio, abs=0.011)  # printed to two decimals
    assert conv_t + other_t == pytest.approx(1.0, abs=0.011)
    assert conv > conv_t > 0  # the student cascades add convolutions


def test_profile_counts_the_convolutions_once():
    """The forward and backward convolutions, kernels included, against all operators."""
    import torch

    from benchmarks.bench_sft import profile_summary
    from benchmarks.common import print_profile

    conv = torch.nn.Conv2d(2, 8, 3, padding=1)
    x = torch.randn(2, 2, 32, 32)

    def step():
        (conv(x).relu() * 2).sum().backward()

    spent = print_profile(step, "cpu", "test")
    assert 0 < spent["convolution"] < spent["total"]
    summary = profile_summary(
        {"total": 2.0, "convolution": 1.5}, {"total": 3.6, "convolution": 3.0}
    )
    assert summary.startswith(
        "profiled SFT / teacher time 1.80: convolutions 1.50 (teacher alone 0.75), everything "
        "else 0.30 (teacher alone 0.25)"
    )


def test_block_convolution_backward_counts_as_convolution_once():
    """BlockConv2d's backward computes the weight gradients with matrix products of its own:
    the split counted them as "everything else" (only its aten::convolution_backward, the
    input gradient, as convolution)."""
    from types import SimpleNamespace

    from benchmarks.common import _convolution_time

    def event(name, total, parent=None):
        return SimpleNamespace(name=name, cpu_time_total=total, cpu_parent=parent)

    backward = event("_ShiftedWeightGradConvBackward", 10.0)
    events = [
        backward,
        event("aten::convolution_backward", 4.0, backward),  # its input gradient
        event("aten::baddbmm_", 5.0, backward),  # its weight gradient
        event("aten::convolution", 3.0),
        event("aten::add", 2.0),
    ]
    assert _convolution_time(events, cuda=False) == 13.0


def test_round_ratios_pair_each_round_and_give_nearest_rank_quartiles():
    from benchmarks.common import interleaved_samples, median, round_ratios

    # Round r: numerator r + 1 against denominator 1, except that round 2's machine was twice
    # as slow for both (paired, its ratio stays 3).
    numerator = [1.0, 2.0, 6.0, 4.0, 5.0, 6.0, 7.0]
    denominator = [1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    spread = round_ratios(numerator, denominator)
    assert spread == {"min": 1.0, "q1": 2.0, "median": 4.0, "q3": 6.0, "max": 7.0}
    assert median(numerator) / median(denominator) == 5.0  # the ratio of medians differs
    assert round_ratios([3.0], [2.0]) == dict.fromkeys(("min", "q1", "median", "q3", "max"), 1.5)
    with pytest.raises(ValueError, match="equally long"):
        round_ratios([1.0, 2.0], [1.0])

    calls = []
    samples = interleaved_samples(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu", 1, 3
    )
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then round-robin
    assert [len(v) for v in samples.values()] == [3, 3]


def test_bench_conv_times_both_backward_paths_of_the_block_convolution():
    quick = ("--batch", "1", "--rounds", "1", "--warmup", "0", "--threads", "1")
    # 1 x 128 x 128 = MIN_POSITIONS: the smallest size that takes the path.
    out = _run("benchmarks.bench_conv", "--size", "128", *quick, "--cases", "conv", "d3_cascade")
    assert out["path_taken"] is True
    assert [row["case"] for row in out["rows"]] == ["conv", "d3_cascade"]
    for row in out["rows"]:
        assert row["speedup"] == pytest.approx(row["pytorch_s"] / row["ours_s"])
    assert 0 < out["weight_gradient_relative_difference"] < 1e-4  # float32 rounding only
    below = _run("benchmarks.bench_conv", "--size", "64", *quick, "--cases", "conv")
    assert below["path_taken"] is False and below["weight_gradient_relative_difference"] == 0
    # The thin-input convolution below its own threshold, taken with --min-positions 0.
    thin = ("--size", "64", *quick, "--cases", "conv", "--chans", "2", "--out-chans", "32")
    assert _run("benchmarks.bench_conv", *thin)["path_taken"] is False
    forced = _run("benchmarks.bench_conv", *thin, "--min-positions", "0")
    assert forced["path_taken"] is True and forced["weight_gradient_relative_difference"] < 1e-4
    paper = _run("benchmarks.bench_conv", "--size", "128", *quick, "--cases", "d3_cascade",
                 "--presets", "paper")  # fmt: skip
    assert paper["presets"] == ["dccnn_d5c5_paper", "dccnn_d3c5_paper"]
    assert out["presets"] == ["dccnn_d5c5", "dccnn_d3c5"]
