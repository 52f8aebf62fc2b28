"""Volume metrics refuse what would make them NaN or score with another data range than
asked, and write as strict JSON."""

import json
import math
import warnings

import numpy as np
import pytest

from sftkd_fastmri.evaluation import volume_metrics


def _volumes():
    rng = np.random.default_rng(0)
    gt = rng.random((2, 20, 18)).astype(np.float32)
    pred = gt + 0.05 * rng.standard_normal(gt.shape).astype(np.float32)
    return gt, pred


def test_a_target_holding_nan_or_inf_is_refused_by_name():
    """It gave NaN metrics without a word."""
    gt, pred = _volumes()
    for bad in (np.nan, np.inf):
        target = gt.copy()
        target[1, 3, 4] = bad
        with pytest.raises(
            ValueError, match=r"vol\.h5: the target holds NaN or Inf \(slices \[1\]"
        ):
            volume_metrics("vol.h5", target, pred, 1.0)


@pytest.mark.parametrize("max_value", [math.nan, math.inf, 0.0, -1.0, "one"])
def test_a_max_value_other_than_a_finite_positive_number_is_refused_by_name(max_value):
    """NaN gave NaN metrics; 0 or less was quietly replaced by the target's maximum."""
    gt, pred = _volumes()
    with pytest.raises(
        ValueError, match=r"vol\.h5: max_value .* expected a finite number > 0"
    ) as err:
        volume_metrics("vol.h5", gt, pred, max_value)
    assert f" is {max_value!r};" in str(err.value)


def test_the_data_range_defaults_to_the_targets_maximum():
    gt, pred = _volumes()
    assert volume_metrics("a", gt, pred) == volume_metrics("a", gt, pred, float(gt.max()))
    with pytest.raises(ValueError, match=r"a: the target's maximum is -0\.5"):
        volume_metrics("a", -gt - 0.5, pred)


def test_an_exact_reconstruction_scores_psnr_inf_and_writes_as_strict_json():
    """json.dumps wrote PSNR inf as Infinity, which strict JSON readers refuse."""
    gt, _ = _volumes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero warning on the way
        metrics = volume_metrics("exact.h5", gt, gt.copy(), 1.0)
    assert metrics.psnr == math.inf and metrics.nmse == 0.0 and metrics.ssim == 1.0
    row = metrics.as_json_dict()
    assert row["psnr"] is None  # null, as report.json writes a number that is not finite
    assert {k: v for k, v in row.items() if k != "psnr"} == {
        k: v for k, v in metrics.as_dict().items() if k != "psnr"
    }
    json.dumps([row], allow_nan=False)
