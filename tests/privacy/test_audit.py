"""The audit: exact Clopper-Pearson bounds, a sound step stays below the accountant, broken steps are flagged."""

import json

import numpy as np
import pytest
from scipy.stats import binom

import audit_privacy
from dp_utils.errors import UserError
from dp_utils.privacy.audit import (
    AuditConfig,
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_lower_bound,
    run_audit,
)

TRIALS = 300  # per world: enough for a broken step to be flagged, in seconds


def test_clopper_pearson_bounds_are_exact_one_sided_bounds():
    assert clopper_pearson_lower(0, 50, 0.95) == 0 and clopper_pearson_upper(50, 50, 0.95) == 1
    assert clopper_pearson_upper(0, 100, 0.95) == pytest.approx(1 - 0.05 ** (1 / 100))
    lower, upper = clopper_pearson_lower(30, 100, 0.95), clopper_pearson_upper(30, 100, 0.95)
    assert binom.sf(29, 100, lower) == pytest.approx(0.05)  # P(X >= 30 | p = lower) = 5%
    assert binom.cdf(30, 100, upper) == pytest.approx(0.05)  # P(X <= 30 | p = upper) = 5%


def test_a_perfect_test_proves_log_of_its_trial_count():
    positives, negatives = np.ones(1000), np.zeros(1000)
    bound, tpr_lower, fpr_upper = epsilon_lower_bound(positives, negatives, 0.5, delta=0.0, confidence=0.95)
    assert bound == pytest.approx(np.log(tpr_lower / fpr_upper)) and 5.7 < bound < 5.9  # about log(1000 / 3)
    assert epsilon_lower_bound(negatives, positives, 0.5, delta=0.0, confidence=0.95)[0] == 0


@pytest.mark.parametrize("grad_sample_mode", ["flash_bk", "flash"])
def test_a_sound_step_stays_below_the_accountant(grad_sample_mode):
    config = AuditConfig(trials=TRIALS, noise_multiplier=2.0, grad_sample_mode=grad_sample_mode, noise_seed=1)
    result, inside, outside = run_audit(config)
    assert not result.violation and 0 <= result.epsilon_lower_bound < result.accountant_epsilon
    assert result.canary_norm == pytest.approx(1, rel=1e-6)  # the canary is clipped to C, no further
    assert result.accounted_steps == 2 * TRIALS  # one per logical batch, not per physical batch (2 of them)
    assert abs(outside.mean()) < 4 * 2.0 / TRIALS**0.5 and abs(inside.mean() - 1) < 4 * 2.0 / TRIALS**0.5
    assert abs(outside.std() - 2.0) < 4 * 2.0 / (2 * TRIALS) ** 0.5  # the noise, in units of C: sigma


@pytest.mark.parametrize("broken", ["noise", "clip"])
def test_a_broken_step_is_flagged(broken):
    result, _, _ = run_audit(AuditConfig(trials=TRIALS, noise_multiplier=2.0, break_=broken, noise_seed=2))
    assert result.violation and result.epsilon_lower_bound > result.accountant_epsilon


def test_script_writes_table_json_and_png_and_exits_1_on_a_violation(tmp_path, capsys):
    out = tmp_path / "audit"
    flags = ["--trials", TRIALS, "--noise_multiplier", 2, "--noise_seed", 3, "--output_dir", out, "--break", "noise"]
    assert audit_privacy.main(audit_privacy.parse_args([str(f) for f in flags])) == 1
    printed = capsys.readouterr().out
    assert "epsilon lower bound" in printed and "VIOLATION" in printed
    report = json.loads((out / "audit.json").read_text())
    assert report["violation"] and report["config"]["break_"] == "noise"
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="--noise_multiplier must be > 0"):
        audit_privacy.parse_args(["--noise_multiplier", "0"])
    with pytest.raises(SystemExit):
        audit_privacy.parse_args(["--help"])
    assert "Default: 5000" in " ".join(capsys.readouterr().out.split())  # argparse wraps the help
