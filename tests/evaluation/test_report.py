"""The study report against hand-computed numbers on fabricated volume metrics."""

from __future__ import annotations

import csv
import json

import pytest

from sftkd_fastmri.evaluation.metrics import VolumeMetrics
from sftkd_fastmri.evaluation.report import ModelEntry, build_report, write_report

PROFILE = {
    "params": 49_285,
    "flops": {"total": 7.5e9, "conv_matmul": 7.4e9, "fft": 1e8},
    "latency": {"median_s": 0.02, "mean_s": 0.021, "std_s": 0.001, "device": "cpu"},
    "peak_memory_mib": 12.5,
}


def volumes(*psnrs: float, ssim: float = 0.95) -> list:
    """One VolumeMetrics per PSNR value (two volumes unless told otherwise)."""
    return [
        VolumeMetrics(f"vol{i}.h5", 8, nmse=0.01 * (i + 1), psnr=p, ssim=ssim + 0.001 * i, hfen=0.3)
        for i, p in enumerate(psnrs)
    ]


def entry(key, kind, psnrs, method=None, variant=None, seed=None, ssim=0.95, profile=PROFILE):
    return dict(
        key=key,
        name=key.replace("_", " "),
        kind=kind,
        method=method,
        variant=variant,
        metrics=volumes(*psnrs, ssim=ssim),
        profile=None if kind == "baseline" else profile,
        seed=seed,
    )


def study(seed=None):
    # teacher 40.1, student 39.5 -> gap 0.6 dB; Std-KD AT 39.7 closes 1/3, SFT-KD AT 40.1 all.
    return [
        entry("zero_filled", "baseline", (31.0, 32.0), ssim=0.7),
        entry("teacher", "teacher", (40.0, 40.2), variant="std", seed=seed, ssim=0.97),
        entry("sft_teacher", "teacher", (40.2, 40.4), variant="sft", seed=seed, ssim=0.975),
        entry("student", "student", (39.4, 39.6), variant="std", seed=seed, ssim=0.96),
        entry("kd_std/at", "kd", (39.6, 39.8), "at", "std", seed=seed, ssim=0.962),
        entry("kd_sft/at", "kd", (40.0, 40.2), "at", "sft", seed=seed, ssim=0.968),
        entry("kd_std/fitnet", "kd", (39.5, 39.5), "fitnet", "std", seed=seed),
    ]


def test_gap_and_gap_closed_match_hand_computation():
    report = build_report(study(), {"title": "t"})
    assert report.gap_psnr == pytest.approx(0.6)
    assert report.gap_ssim == pytest.approx(0.97 - 0.96)
    assert report.model("kd_std/at").gap_closed == pytest.approx(0.2 / 0.6)
    assert report.model("kd_sft/at").gap_closed == pytest.approx(1.0)
    assert report.model("kd_std/fitnet").gap_closed == pytest.approx(0.0)
    assert report.model("teacher").gap_closed is None
    assert report.model("kd_sft/at").delta_psnr_teacher == pytest.approx(0.0)
    assert report.model("student").metrics["psnr_std"] == pytest.approx(0.1)  # population std

    at, fitnet = report.kd_table
    assert (at.name, fitnet.name) == ("AT", "FitNets")
    assert at.std_psnr == pytest.approx(39.7) and at.sft_psnr == pytest.approx(40.1)
    assert at.diff_psnr == pytest.approx(0.4)
    assert at.diff_ssim == pytest.approx(0.006)
    assert at.std_gap_closed == pytest.approx(1 / 3) and at.sft_gap_closed == pytest.approx(1.0)
    # Only Std-KD for FitNets: the SFT side and the difference stay empty.
    assert fitnet.sft_key is None and fitnet.diff_psnr is None
    assert report.sft_teacher_key == "sft_teacher" and report.control_key is None


def test_profile_numbers_are_carried():
    m = build_report(study()).model("student")
    assert m.params == 49_285 and m.flops_fft == 1e8 and m.flops_total == 7.5e9
    assert m.latency_median_s == 0.02 and m.peak_memory_mib == 12.5
    assert build_report(study()).model("zero_filled").params is None


def test_seeds_are_pooled_and_their_spread_reported():
    entries = []
    for seed, shift in ((0, 0.0), (1, 0.2), (2, 0.4)):
        for e in study(seed=seed if seed else None):
            if e["kind"] == "baseline" and seed:
                continue  # the zero-filled baseline does not depend on the seed
            if e["key"] == "student":
                e = entry("student", "student", (39.4 + shift, 39.6 + shift), variant="std")
            entries.append({**e, "seed": seed})
    report = build_report(entries)
    student = report.model("student")
    assert student.seeds == [0, 1, 2]
    assert student.mean("psnr") == pytest.approx(39.7)  # per-seed means 39.5, 39.7, 39.9
    assert student.metrics["psnr_seed_std"] == pytest.approx(0.2)  # sample std of seed means
    assert report.model("teacher").metrics["psnr_seed_std"] == pytest.approx(0.0)
    assert report.num_seeds == 3
    assert not any("seed(s)" in c for c in report.caveats)
    assert "PSNR seed std" in report.to_markdown()
    # A comparison is only as repeated as its least repeated model.
    assert build_report(entries[:-1]).num_seeds == 2
    # the seeds scored, not those declared (a study of seeds [1, 1, 1] scored one)
    assert build_report(entries[:-1], {"seeds": [0, 1, 2, 3]}).num_seeds == 2
    # entries that pool their seeds themselves (no seed each): the seeds declared
    pooled = [{**e, "seed": None} for e in study()]
    assert build_report(pooled, {"seeds": [0, 1, 2]}).num_seeds == 3
    assert build_report(pooled, {"seeds": [1, 1, 1]}).num_seeds == 1


def test_a_model_scored_once_is_one_seed_whatever_the_seeds_declared():
    """seeds: [1, 1, 1] trained and scored each model once; the report said 3 seeds and
    dropped the few-seeds caveat. A model given the same seed twice is refused."""
    report = build_report(study(seed=1), {"seeds": [1, 1, 1]})
    assert report.num_seeds == 1
    assert json.loads(report.to_json())["num_seeds"] == 1
    assert any(c.startswith("Only 1 seed(s)") for c in report.caveats)
    twice = study(seed=1) + [entry("teacher", "teacher", (40.0, 40.2), variant="std", seed=1)]
    with pytest.raises(ValueError, match="entries with key 'teacher' repeat seed 1"):
        build_report(twice)


def test_paired_seed_differences_of_sft_and_std_kd():
    # SFT-KD minus Std-KD per seed: +0.3, -0.1, +0.4 (seed order differs between the two)
    entries = [
        entry("teacher", "teacher", (40.0, 40.0), variant="std", seed=0),
        entry("student", "student", (39.5, 39.5), variant="std", seed=0),
    ]
    std = {0: 39.6, 1: 39.8, 2: 39.7}
    sft = {2: 40.1, 0: 39.9, 1: 39.7}
    entries += [entry("kd_std/at", "kd", (v, v), "at", "std", seed=k) for k, v in std.items()]
    entries += [entry("kd_sft/at", "kd", (v, v), "at", "sft", seed=k) for k, v in sft.items()]
    row = build_report(entries).kd_table[0]
    assert sorted(row.seed_diffs_psnr) == pytest.approx(sorted([0.3, -0.1, 0.4]))
    assert row.diff_psnr == pytest.approx(0.2)
    assert row.diff_psnr_seed_std == pytest.approx(0.26457513, rel=1e-6)  # std(0.3, -0.1, 0.4)
    assert row.sft_wins == (2, 3)
    report = build_report(entries)
    assert "+0.200 ± 0.265 (2/3)" in report.to_markdown()
    assert any("2 of 3 (method, seed) pairs" in line for line in report.to_markdown().splitlines())
    assert report.kd_table[0].as_dict()["sft_wins"] == "2/3"
    # a seed one variant lacks: the cell says how many seeds its ± and count cover
    unpaired = build_report([e for e in entries if e["key"] != "kd_std/at" or e["seed"] != 2])
    assert "(1/2; 2 of 3 seeds paired)" in unpaired.to_markdown()
    # a single seed: no spread, no per-seed count
    single = build_report([e for e in entries if e["seed"] == 0]).kd_table[0]
    assert single.diff_psnr_seed_std is None and single.sft_wins == (1, 1)


def test_missing_models_do_not_break_the_report():
    only_std = [e for e in study() if e["key"] not in ("teacher", "kd_sft/at", "sft_teacher")]
    report = build_report(only_std)
    assert report.gap_psnr is None
    assert all(m.gap_closed is None for m in report.models)
    assert all(r.sft_key is None for r in report.kd_table)
    text = report.to_markdown()
    assert "teacher-student gap is not defined" in text
    assert "Control (a)" not in text  # no SFT-KD, so no SFT caveats
    str(report)


def test_control_a_and_caveats():
    entries = study() + [entry("student_sft_init", "student", (39.8, 40.0), variant="sft")]
    report = build_report(entries, {"epochs": {"std_kd": 30, "sft": 20, "sft_kd": 10}})
    assert report.control_key == "student_sft_init"
    assert report.model("student_sft_init").gap_closed == pytest.approx(0.4 / 0.6)
    assert report.kd_table[0].sft_minus_control_psnr == pytest.approx(0.2)
    caveats = " ".join(report.caveats)
    assert "Only 1 seed(s)" in caveats and "Control (a) present" in caveats
    assert "std_kd: 30" in caveats
    assert "SFT - ctrl(a)" in report.to_markdown()


def test_no_gap_when_student_beats_teacher():
    entries = [
        entry("teacher", "teacher", (39.0, 39.0)),
        entry("student", "student", (39.5, 39.5)),
        entry("kd_std/at", "kd", (39.6, 39.6), "at", "std"),
    ]
    report = build_report(entries)
    assert report.model("kd_std/at").gap_closed is None
    assert any("undefined" in c for c in report.caveats)


def test_gap_below_threshold_reports_no_fraction():
    entries = [
        entry("teacher", "teacher", (39.53, 39.53)),
        entry("student", "student", (39.5, 39.5)),
        entry("kd_std/at", "kd", (39.8, 39.8), "at", "std"),
    ]
    report = build_report(entries)
    assert report.gap_psnr == pytest.approx(0.03)
    assert report.model("kd_std/at").gap_closed is None
    assert any("below 0.1 dB" in c for c in report.caveats)
    # The threshold is an argument: with 0.01 dB the 0.03 dB gap counts (0.3 / 0.03 = 10).
    low = build_report(entries, min_gap_db=0.01)
    assert low.model("kd_std/at").gap_closed == pytest.approx(10.0)


def test_invalid_entries_raise():
    with pytest.raises(ValueError, match="kind"):
        ModelEntry("x", "x", "teacherz", volumes(1.0))
    with pytest.raises(ValueError, match="method"):
        ModelEntry("x", "x", "kd", volumes(1.0), variant="std")
    with pytest.raises(ValueError, match="unknown field"):
        ModelEntry.from_dict({**entry("t", "teacher", (1.0,)), "colour": "red"})
    with pytest.raises(ValueError, match="more than one teacher"):
        build_report([entry("t1", "teacher", (1.0,)), entry("t2", "teacher", (1.0,))])
    with pytest.raises(ValueError, match="disagree"):
        build_report([entry("a", "kd", (1.0,), "at", "std"), entry("a", "kd", (1.0,), "at", "sft")])
    with pytest.raises(ValueError, match="two STD-KD"):
        build_report([entry("a", "kd", (1.0,), "at", "std"), entry("b", "kd", (1.0,), "at", "std")])


def test_write_report_files(tmp_path):
    report = build_report(
        study(), {"title": "Demo study", "dataset": "demo brain", "split": "test"}
    )
    paths = write_report(report, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "report.csv",
        "report.json",
        "report.md",
    ]  # no temporary files left behind

    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["key"] for r in rows] == [m.key for m in report.models]
    kd = next(r for r in rows if r["key"] == "kd_std/at")
    assert float(kd["gap_closed"]) == pytest.approx(1 / 3)
    assert float(kd["psnr_mean"]) == pytest.approx(39.7)
    assert rows[0]["params"] == ""  # zero-filled has no profile

    data = json.loads(paths["json"].read_text())
    assert data["gap_psnr"] == pytest.approx(0.6)
    assert [m["key"] for m in data["models"]] == [m.key for m in report.models]
    assert data["kd_table"][1]["sft_psnr"] is None

    md = paths["markdown"].read_text()
    assert md.startswith("# Demo study")
    for needle in (
        "| AT |",
        "| FitNets |",
        "Std-KD PSNR",
        "data range = the volume's max",
        "5 N log2 N",
        "Only 1 seed(s)",
        "Control (a) missing",
        "33%",
    ):
        assert needle in md, needle
    text = str(report)
    assert "Demo study" in text and "kd_std/at".replace("_", " ") in text


def test_control_b_and_the_summary_say_what_the_seeds_show():
    """Control (b): Std-KD trained for the SFT stage's and SFT-KD's epochs together. The
    summary states where SFT-KD is below either control, and per-seed spreads of both."""
    entries = []
    # per seed (0, 1, 2): SFT-KD AT 40.0/40.2/40.1; ctrl(a) 39.9/40.3/40.0; ctrl(b) 39.8/40.0/39.9
    for seed, (sft, ctrl, budget) in enumerate(
        ((40.0, 39.9, 39.8), (40.2, 40.3, 40.0), (40.1, 40.0, 39.9))
    ):
        entries += [
            entry("teacher", "teacher", (40.4, 40.4), variant="std", seed=seed),
            entry("student", "student", (39.5, 39.5), variant="std", seed=seed),
            entry("ctrl", "student", (ctrl, ctrl), variant="sft", seed=seed),
            entry("kd_std/at", "kd", (39.7, 39.7), "at", "std", seed=seed),
            entry("kd_sft/at", "kd", (sft, sft), "at", "sft", seed=seed),
            entry("kd_budget/at", "kd", (budget, budget), "at", "budget", seed=seed),
        ]
    report = build_report(entries, {"epochs": {"sft": 2, "kd": 3}})
    row = report.kd_table[0]
    assert row.budget_key == "kd_budget/at" and row.budget_psnr == pytest.approx(39.9)
    assert row.sft_minus_budget_psnr == pytest.approx(0.2)
    assert row.seed_diffs_budget_psnr == pytest.approx([0.2, 0.2, 0.2])
    assert row.seed_diffs_control_psnr == pytest.approx([0.1, -0.1, 0.1])
    assert report.model("kd_budget/at").gap_closed == pytest.approx(0.4 / 0.9)
    text = report.to_markdown()
    assert "PSNR SFT - ctrl(b)" in text
    assert "+0.033 ± 0.115 (2/3)" in text  # SFT - ctrl(a): mean, std over seeds, seeds ahead
    assert "+0.200 ± 0.000 (3/3)" in text  # SFT - ctrl(b)
    assert "in every paired seed for AT" in text
    assert "SFT-KD is above control (b) for 1 of 1 method(s)" in text
    caveats = " ".join(report.caveats)
    assert "Control (b) present" in caveats and "not above control (b)" not in caveats

    # without control (b), the caveat states the unmatched epochs; a method below control (a)
    # and a single seed are named in the summary
    fewer = [e for e in entries if e["key"] != "kd_budget/at" and e["seed"] == 1]
    report = build_report(fewer, {"epochs": {"teacher": 5, "sft": 2, "kd": 3}})
    caveats = " ".join(report.caveats)
    assert "Control (b) not run: Std-KD students trained 3 epochs from scratch" in caveats
    assert "SFT-KD students 2 (the SFT stage, as student branches) + 3" in caveats
    assert "SFT-KD is not above control (a) for AT (with 1 seed(s): not separable" in caveats
    text = report.to_markdown()
    assert "With 1 seed(s) that does not separate them from seed noise" in text
    assert "SFT-KD is above control (a) for 0 of 1 method(s)" in text


def test_conclusions_below_a_control_follow_the_paired_seeds():
    """'Comes from the SFT initialisation' / 'explained by its extra epochs' only where the
    SFT-KD student is at or below the control in every one of >= 3 seeds (and, for (b), is
    above Std-KD, so that there is a margin to explain)."""

    def study(sft, ctrl, budget, std):
        entries = []
        for seed in range(3):
            entries += [
                entry("teacher", "teacher", (40.4, 40.4), variant="std", seed=seed),
                entry("student", "student", (39.5, 39.5), variant="std", seed=seed),
                entry("ctrl", "student", (ctrl[seed],) * 2, variant="sft", seed=seed),
                entry("kd_std/at", "kd", (std[seed],) * 2, "at", "std", seed=seed),
                entry("kd_sft/at", "kd", (sft[seed],) * 2, "at", "sft", seed=seed),
                entry("kd_budget/at", "kd", (budget[seed],) * 2, "at", "budget", seed=seed),
            ]
        return " ".join(build_report(entries).caveats)

    # below both controls in every seed, above Std-KD: both conclusions
    text = study(sft=(40, 40, 40), ctrl=(40.1,) * 3, budget=(40.2,) * 3, std=(39.8,) * 3)
    assert "for AT (in every seed: there its result comes from the SFT initialisation" in text
    assert "for AT (in every seed: there the SFT-KD margin over Std-KD is explained" in text
    # mixed signs over seeds, mean below: no conclusion
    text = study(sft=(40.4, 39.5, 40.07), ctrl=(40.0,) * 3, budget=(40.5,) * 3, std=(39.8,) * 3)
    assert "for AT (above it in some seeds: not separable from seed noise)" in text
    # below control (b) but also below Std-KD: no margin to explain
    text = study(sft=(39.5,) * 3, ctrl=(39.4,) * 3, budget=(40.0,) * 3, std=(40.0,) * 3)
    assert "control (b) for AT (SFT-KD is not above Std-KD either)" in text
    assert "explained by its extra epochs" not in text


def test_metrics_on_the_validation_split_are_said_to_be_biased():
    """The study names splits with their challenge (``multicoil_val``): the caveat missed
    them when it compared the name with "val" alone."""

    def says(meta):
        return any("validation split" in c for c in build_report(study(), meta).caveats)

    assert says({"split": "multicoil_val"}) and says({"split": "val"})
    assert says({"split": "knee_select", "val_split": "knee_select"})  # the selecting split
    assert not says({"split": "multicoil_test_full", "val_split": "multicoil_val_select"})
    # fastMRI's val split as the held-out test of a study selecting on another split
    assert not says({"split": "singlecoil_val", "val_split": "singlecoil_val_select"})
    assert not says({"title": "no split named"})


def test_checkpoints_chosen_on_a_split_the_networks_trained_on_are_said_to_be():
    def says(meta):
        return any("combine_train_val" in c for c in build_report(study(), meta).caveats)

    assert says({"split": "multicoil_test_full", "combine_train_val": True})
    assert not says({"split": "multicoil_test_full", "combine_train_val": False})


def test_a_metric_that_is_not_finite_is_no_number_in_the_text():
    nan = float("nan")
    entries = study()
    entries[4] = entry("kd_std/at", "kd", (nan, 39.8), "at", "std")
    text = build_report(entries).to_markdown()
    assert "nan" not in text.lower()
    seeds = []  # one seed of three not finite: no spread or count over the others
    for seed in range(3):
        seeds += [dict(e, seed=seed) for e in study() if e["kind"] != "baseline"]
    seeds[3] = entry("kd_std/at", "kd", (nan, 39.8), "at", "std", seed=0)
    assert "nan" not in build_report(seeds, {"seeds": [0, 1, 2]}).to_markdown().lower()
    entries = study()
    entries[1] = entry("teacher", "teacher", (nan, 40.2), variant="std")
    report = build_report(entries)
    assert report.gap_psnr is None and report.model("kd_sft/at").gap_closed is None
    text = report.to_markdown()
    assert "a mean is not finite, so the teacher-student gap is not defined" in text
    assert "not below the teacher" not in text and "nan%" not in text


def test_variants_equal_in_every_seed_are_ties_not_ahead():
    """Per seed SFT-KD and Std-KD (and control (a)) have the same mean PSNR over other volume
    values; pooling rounds their difference to ~1e-14 dB, which read as "ahead"."""
    entries = []
    for seed in range(3):
        entries += [
            entry("teacher", "teacher", (40.0, 40.2), variant="std", seed=seed),
            entry("student", "student", (39.4, 39.6), variant="std", seed=seed),
            entry("ctrl", "student", (39.6, 40.0), variant="sft", seed=seed),
            entry("kd_std/at", "kd", (39.7, 39.9), "at", "std", seed=seed),
            entry("kd_sft/at", "kd", (39.3, 40.3), "at", "sft", seed=seed),
        ]
    report = build_report(entries, {"seeds": [0, 1, 2]})
    (row,) = report.kd_table
    assert abs(row.diff_psnr) < 1e-9 and row.sft_wins == (0, 3)
    text = report.to_markdown()
    assert "above Std-KD's for 0 of 1 method(s)" in text
    assert "SFT-KD is above control (a) for 0 of 1" in text
    assert "not above control (a) for AT (in every seed: there its result comes from" in text
