"""White-box audit of the DP step: the epsilon that a membership test on a canary proves, beside the accountant's.

The adversary knows the model, every other row and each privatised update (Nasr et al. 2021, 2023), and guesses
whether a canary row was in the dataset. The canary's residual is so large that the engine clips its gradient to
norm C; its clipped gradient u and the other rows' clipped sum S are read from two noise-free runs of the same step.
Each trial resets the model, runs the real step (`make_private`'s Poisson loader, the clipping engine, physical
batches, the DP optimizer's noise) with the canary in or out, and scores the update by

    score = <(-update * B / lr) - S, u / |u|> / C        out: N(0, sigma^2)    in: N(|u| / C, sigma^2) at q = 1

(B the expected batch size, SGD at rate lr). A threshold on the score is a test; for any (epsilon, delta)-DP step
TPR <= e^epsilon FPR + delta (and the same with the roles of in and out swapped), so one-sided Clopper-Pearson bounds
TPR >= TPR_lo, FPR <= FPR_hi give, at their confidence, epsilon >= log((TPR_lo - delta) / FPR_hi) (Jagielski et al.
2020). The test (direction and threshold) is chosen on a quarter of the trials, and its rates are bounded on the
other three quarters, once. A lower bound above the accountant's epsilon is a violation: the step leaks more than is
accounted.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import beta
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .privacy_engine import PrivacyWarning, make_private
from .randomness import generator_from_entropy

BREAKS = ("none", "noise", "clip")  # deliberately broken steps the audit must flag
BREAK_FACTOR = 10.0


@dataclass
class AuditConfig:
    """The audited step: a tiny MLP on `rows` rows (one the canary), Poisson rate logical_batch_size / rows."""

    trials: int = 5000  # per world (canary in, canary out)
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    rows: int = 8
    logical_batch_size: int = 8
    max_physical_batch_size: int = 4
    grad_sample_mode: str = "flash_bk"
    accountant: str = "prv"
    delta: float = 1e-5
    confidence: float = 0.95
    break_: str = "none"  # "noise": noise sigma / 10 while the accountant is told sigma; "clip": clipping at 10 C
    seed: int = 0  # the model and the rows; the noise and batches stay secret unless noise_seed
    noise_seed: int | None = None


@dataclass
class AuditResult:
    config: AuditConfig
    accountant_epsilon: float  # of one step, by the accountant the real step fed
    epsilon_lower_bound: float  # proved by the test at `confidence` (0 when no threshold proves anything)
    threshold: float
    direction: str  # "in if above": the test says "in" when score > threshold; "out if below": "out" when score < it
    tpr: float
    fpr: float
    tpr_lower: float
    fpr_upper: float
    canary_norm: float  # |u| / C: 1 when the canary is clipped to C
    accounted_steps: int  # steps the accountant counted: one per logical batch, so 2 * trials
    violation: bool

    def to_json(self) -> dict:
        return asdict(self)


def clopper_pearson_lower(successes: int, trials: int, confidence: float) -> float:
    """One-sided lower confidence bound of a binomial proportion (exact, Clopper-Pearson)."""
    return 0.0 if successes == 0 else float(beta.ppf(1 - confidence, successes, trials - successes + 1))


def clopper_pearson_upper(successes: int, trials: int, confidence: float) -> float:
    """One-sided upper confidence bound of a binomial proportion (exact, Clopper-Pearson)."""
    return 1.0 if successes == trials else float(beta.ppf(confidence, successes + 1, trials - successes))


def epsilon_lower_bound(
    positives: np.ndarray, negatives: np.ndarray, threshold: float, delta: float, confidence: float
) -> tuple[float, float, float]:
    """(epsilon, TPR_lo, FPR_hi) proved by the test `score > threshold` at `confidence` (epsilon 0 if none)."""
    tp, fp = int((positives > threshold).sum()), int((negatives > threshold).sum())
    tpr_lower = clopper_pearson_lower(tp, len(positives), confidence)
    fpr_upper = clopper_pearson_upper(fp, len(negatives), confidence)
    if tpr_lower - delta <= 0:
        return 0.0, tpr_lower, fpr_upper
    return max(0.0, math.log((tpr_lower - delta) / fpr_upper)), tpr_lower, fpr_upper


def best_threshold(
    positives: np.ndarray, negatives: np.ndarray, delta: float, confidence: float
) -> tuple[float, float]:
    """(threshold, epsilon) of the test, among the scores, that proves the largest epsilon on these scores."""
    candidates = np.unique(np.concatenate([positives, negatives]))[:-1]
    bounds = [epsilon_lower_bound(positives, negatives, t, delta, confidence)[0] for t in candidates]
    best = int(np.argmax(bounds)) if bounds else 0
    return (float(candidates[best]), bounds[best]) if bounds else (0.0, 0.0)


class _Step:
    """The real DP step on a tiny model, reset before every trial; `update(canary)` returns the flat update."""

    def __init__(self, config: AuditConfig, noise_multiplier: float, noise_generator: torch.Generator | None):
        generator = torch.Generator().manual_seed(config.seed)
        features, outputs = 8, 4
        torch.manual_seed(config.seed)
        self.model = nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, outputs)).double()
        self.initial = {k: v.clone() for k, v in self.model.state_dict().items()}
        x = torch.randn(config.rows, features, generator=generator, dtype=torch.float64)
        y = torch.randn(config.rows, outputs, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            y[0] = self.model(x[:1])[0] + 1e3  # the canary (row 0): a residual far beyond any clipping norm
        is_canary = torch.arange(config.rows) == 0
        steps_per_epoch = math.ceil(config.rows / config.logical_batch_size)
        with warnings.catch_warnings():  # q = 1 (the default) is on purpose: the tightest single-step audit
            warnings.simplefilter("ignore", PrivacyWarning)
            self.module, self.optimizer, self.criterion, self.loader = make_private(
                module=self.model,
                optimizer=torch.optim.SGD(self.model.parameters(), lr=1.0),
                data_loader=DataLoader(TensorDataset(x, y, is_canary), batch_size=config.rows // steps_per_epoch),
                noise_multiplier=noise_multiplier,
                max_grad_norm=config.max_grad_norm,
                grad_sample_mode=config.grad_sample_mode,
                accountant=config.accountant,
                noise_generator=noise_generator,
                sampling_seed=None if config.noise_seed is None else config.noise_seed + 1,
            )
        self.physical = config.max_physical_batch_size

    def update(self, canary: bool) -> torch.Tensor:
        """-(new - old) / lr * B: the noised clipped sum the optimizer applied, with the canary in or out."""
        self.model.load_state_dict(self.initial)
        x, y, is_canary = next(iter(self.loader))  # one Poisson batch
        keep = torch.ones_like(is_canary) if canary else ~is_canary
        x, y = x[keep], y[keep]
        for start in range(0, len(x), self.physical):  # physical batches of the logical batch: noised once
            physical_batch = slice(start, start + self.physical)
            self.criterion(self.module(x[physical_batch]), y[physical_batch]).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        change = [(new - self.initial[name]).flatten() for name, new in self.model.state_dict().items()]
        return -torch.cat(change) * self.optimizer.expected_batch_size


def run_audit(config: AuditConfig) -> tuple[AuditResult, np.ndarray, np.ndarray]:
    """Audit `config`'s step; returns the result and the scores with the canary in and out."""
    if config.break_ not in BREAKS:
        raise ValueError(f"break_ must be one of {BREAKS}, got {config.break_!r}")
    reference = _Step(config, 0.0, None)  # noise-free: the clipped sums are exact
    others = reference.update(canary=False)
    canary = reference.update(canary=True) - others
    canary_norm = canary.norm().item()
    direction = canary / canary_norm

    noise_generator = None if config.noise_seed is None else generator_from_entropy(config.noise_seed)
    step = _Step(config, config.noise_multiplier, noise_generator)
    if config.break_ == "noise":  # the noise std is sigma C: C / 10 gives a tenth of the noise the accountant is told
        step.optimizer.max_grad_norm /= BREAK_FACTOR
    elif config.break_ == "clip":  # the engine clips at 10 C, the noise and the accountant assume C
        step.optimizer.clipping_engine.max_grad_norm *= BREAK_FACTOR
    scores = {True: [], False: []}
    accountant_epsilon = None
    for trial in range(2 * config.trials):
        canary_in = trial % 2 == 0
        scores[canary_in].append(((step.update(canary_in) - others) @ direction).item() / config.max_grad_norm)
        if accountant_epsilon is None:
            accountant_epsilon = step.optimizer.privacy_engine.get_epsilon(config.delta)  # after exactly one step
    inside, outside = np.array(scores[True]), np.array(scores[False])
    # The calibration trials choose the test (its direction and threshold); the others bound its rates, once.
    calibration = config.trials // 4
    tests = {"in if above": (inside, outside), "out if below": (-outside, -inside)}
    chosen = {
        name: best_threshold(positives[:calibration], negatives[:calibration], config.delta, config.confidence)
        for name, (positives, negatives) in tests.items()
    }
    name = max(chosen, key=lambda test: chosen[test][1])
    threshold = chosen[name][0]
    positives, negatives = (part[calibration:] for part in tests[name])
    bound, tpr_lower, fpr_upper = epsilon_lower_bound(positives, negatives, threshold, config.delta, config.confidence)
    tpr, fpr = float((positives > threshold).mean()), float((negatives > threshold).mean())
    threshold = threshold if name == "in if above" else -threshold  # on the score's own scale
    history = step.optimizer.privacy_engine.accountant.history
    result = AuditResult(
        config=config,
        accountant_epsilon=accountant_epsilon,
        epsilon_lower_bound=bound,
        threshold=threshold,
        direction=name,
        tpr=tpr,
        fpr=fpr,
        tpr_lower=tpr_lower,
        fpr_upper=fpr_upper,
        canary_norm=canary_norm / config.max_grad_norm,
        accounted_steps=sum(entry[2] for entry in history),
        violation=bool(bound > accountant_epsilon),
    )
    return result, inside, outside


def plot_scores(result: AuditResult, inside: np.ndarray, outside: np.ndarray, path: Path) -> bool:
    """A PNG of the two score distributions and the threshold; False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(np.concatenate([inside, outside]), bins=80)
    axes.hist(outside, bins=bins, alpha=0.6, label="canary out")
    axes.hist(inside, bins=bins, alpha=0.6, label="canary in")
    axes.axvline(result.threshold, color="black", linestyle="--", label=f"threshold (test: {result.direction})")
    axes.set_xlabel("score: update projected on the canary's clipped gradient, in units of C")
    axes.set_ylabel("trials")
    verdict = "VIOLATION" if result.violation else "consistent"
    bound, epsilon = result.epsilon_lower_bound, result.accountant_epsilon
    axes.set_title(f"epsilon >= {bound:.2f} (audit) vs {epsilon:.2f} (accountant): {verdict}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
