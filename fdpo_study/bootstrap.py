"""Statistics of the divergence study: bootstrap over seeds x prompts, Pareto flags that respect it, frontier gaps.

The study's values come as arrays ``[S, P]`` (seeds x evaluation prompts; one model per seed). Seeds are the
run-to-run variation (other preference pairs, data order, training noise and evaluation noise), prompts the
evaluation variation. :func:`bootstrap` resamples both at once (seeds with replacement, then prompts with
replacement, the same prompt draw for every seed), so a ± here covers both; with one seed it is over prompts only.
Models compared at the same seed share pairs and noise, so differences are taken paired (same draws).

Nothing here knows about models or files: numpy arrays in, numbers out (tested on synthetic values).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

DEFAULT_BOOT = 2000
DEFAULT_SEED = 20240915


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap standard error and percentile confidence interval."""

    mean: float
    se: float
    low: float
    high: float
    seeds: int
    prompts: int

    def as_dict(self) -> dict:
        return {
            "mean": self.mean,
            "se": self.se,
            "ci": [self.low, self.high],
            "seeds": self.seeds,
            "prompts": self.prompts,
        }

    @property
    def significant(self) -> int:
        """+1 if the interval lies above 0, -1 if below, 0 if it contains 0 (a tie)."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0


def _as_2d(values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"values must be [seeds, prompts] with at least one of each; got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("values must be finite")
    return array


def draws(seeds: int, prompts: int, n_boot: int = DEFAULT_BOOT, rng_seed: int = DEFAULT_SEED):
    """The bootstrap index draws ``([n_boot, seeds], [n_boot, prompts])``; share them to pair statistics."""
    rng = np.random.default_rng(rng_seed)
    return rng.integers(seeds, size=(n_boot, seeds)), rng.integers(prompts, size=(n_boot, prompts))


def resampled_means(values, seed_idx: np.ndarray, prompt_idx: np.ndarray) -> np.ndarray:
    """Bootstrap replicates ``[n_boot]`` of the mean of ``values [S, P]`` under the given draws."""
    values = _as_2d(values)
    # Mean over the drawn prompts for each seed, then over the drawn seeds: two gathers, no [n_boot, S, P] copy.
    per_seed = np.stack([values[:, idx].mean(1) for idx in prompt_idx])  # [n_boot, S]
    return np.take_along_axis(per_seed, seed_idx, 1).mean(1)


def bootstrap(values, n_boot: int = DEFAULT_BOOT, level: float = 0.95, rng_seed: int = DEFAULT_SEED) -> Estimate:
    """Mean of ``values [S, P]`` (or ``[P]``: one seed) with a bootstrap over seeds x prompts."""
    values = _as_2d(values)
    seed_idx, prompt_idx = draws(*values.shape, n_boot, rng_seed)
    reps = resampled_means(values, seed_idx, prompt_idx)
    tail = (1 - level) / 2
    low, high = np.quantile(reps, [tail, 1 - tail])
    return Estimate(float(values.mean()), float(reps.std(ddof=1)), float(low), float(high), *values.shape)


def paired(a, b, **kwargs) -> Estimate:
    """``a - b`` for two models on the same seeds and prompts (paired bootstrap)."""
    a, b = _as_2d(a), _as_2d(b)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have the same [seeds, prompts] shape; got {a.shape} and {b.shape}")
    return bootstrap(a - b, **kwargs)


def pareto_flags(rewards: list, diversities: list, **kwargs) -> list[str]:
    """Pareto flag of each model from its ``[S, P]`` reward and diversity (same seeds and prompts for all).

    ``"yes"``: no other model is at least as good in both means (the classic front). ``"no"``: another model is
    at least as good in both means and significantly better (paired 95% bootstrap interval above 0) in at least
    one. ``"tie"``: dominated only within noise (no dominating model is significantly better in either).
    """
    if len(rewards) != len(diversities):
        raise ValueError("one reward and one diversity array per model")
    means = [(_as_2d(r).mean(), _as_2d(d).mean()) for r, d in zip(rewards, diversities)]
    flags = []
    for i, (r_i, d_i) in enumerate(means):
        dominators = [
            j for j, (r_j, d_j) in enumerate(means) if j != i and r_j >= r_i and d_j >= d_i and (r_j, d_j) != (r_i, d_i)
        ]
        if not dominators:
            flags.append("yes")
            continue
        significant = any(
            paired(rewards[j], rewards[i], **kwargs).significant > 0
            or paired(diversities[j], diversities[i], **kwargs).significant > 0
            for j in dominators
        )
        flags.append("no" if significant else "tie")
    return flags


def front_mask(rewards, diversities) -> np.ndarray:
    """Which of the points ``[G]`` are on their own Pareto front (no other point at least as good in both, better
    in one): an over-optimised strength that lost reward and diversity is not part of the frontier."""
    r, d = np.asarray(rewards, float), np.asarray(diversities, float)
    at_least = (r[None, :] >= r[:, None]) & (d[None, :] >= d[:, None])
    better = at_least & ((r[None, :] > r[:, None]) | (d[None, :] > d[:, None]))
    return ~better.any(1)


def curve_at(rewards: np.ndarray, diversities: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Diversity at the given reward ``levels`` on the frontier: the piecewise-linear curve through the points on
    their Pareto front (:func:`front_mask`), sorted by reward; flat beyond its ends.

    ``rewards``, ``diversities``: ``[..., G]`` (one point per regularisation strength).
    """
    rewards, diversities = np.asarray(rewards, float), np.asarray(diversities, float)
    flat_r, flat_d = rewards.reshape(-1, rewards.shape[-1]), diversities.reshape(-1, rewards.shape[-1])
    out = np.empty((flat_r.shape[0], len(levels)))
    for k, (r, d) in enumerate(zip(flat_r, flat_d)):
        keep = front_mask(r, d)
        r, d = r[keep], d[keep]
        order = np.argsort(r, kind="stable")
        out[k] = np.interp(levels, r[order], d[order])
    return out.reshape(*rewards.shape[:-1], len(levels))


def _front_range(rewards: np.ndarray, diversities: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if diversities is None:
        return np.min(rewards, 1), np.max(rewards, 1)
    masked = [r[front_mask(r, d)] for r, d in zip(rewards, diversities)]
    return np.array([m.min() for m in masked]), np.array([m.max() for m in masked])


def common_levels(
    reward_a: np.ndarray,
    reward_b: np.ndarray,
    count: int = 5,
    diversity_a: np.ndarray | None = None,
    diversity_b: np.ndarray | None = None,
) -> np.ndarray | None:
    """``count`` reward levels inside the reward range that every seed's frontier of both divergences covers.

    ``reward_*``: ``[S, G]`` per-seed curve points (with ``diversity_*``, the range of their Pareto fronts).
    None when the ranges do not overlap.
    """
    (lo_a, hi_a), (lo_b, hi_b) = _front_range(reward_a, diversity_a), _front_range(reward_b, diversity_b)
    low = max(lo_a.max(), lo_b.max())
    high = min(hi_a.min(), hi_b.min())
    if not high > low:
        return None
    # Interior points: the ends are where a curve is read at its last point, with the least support.
    return low + (high - low) * (np.arange(count) + 0.5) / count


def sign_flip_p(values) -> float:
    """Exact two-sided sign-flip (paired permutation) p-value of mean(values) = 0 over the seeds."""
    values = np.asarray(values, float)
    observed = abs(values.mean())
    flips = np.array(list(itertools.product((1.0, -1.0), repeat=len(values))))
    return float(np.mean(np.abs((flips * values).mean(1)) >= observed - 1e-12))


def frontier_gap(
    reward_a,
    diversity_a,
    reward_b,
    diversity_b,
    levels: int = 5,
    n_boot: int = DEFAULT_BOOT,
    level: float = 0.95,
    rng_seed: int = DEFAULT_SEED,
) -> dict:
    """Does divergence b's reward-diversity curve lie above a's? Values ``[S, G, P]`` (seeds x strengths x prompts;
    each curve its own G).

    Per seed, each divergence's frontier runs through its non-dominated points among the G (means over prompts);
    both are read at common reward levels (inside the range every seed's frontiers cover) and the gap is b's
    diversity minus a's. The estimate is the gap averaged over levels and seeds; its interval comes from
    resampling seeds and prompts (paired: the same draws for both divergences, the levels held fixed).
    Verdict: ``"b dominates"`` if the interval of the mean gap lies above 0 and no level's interval lies below 0,
    ``"a dominates"`` the mirror, otherwise ``"tie"`` (including mixed signs across levels: curves that cross).
    """
    arrays = [np.asarray(x, float) for x in (reward_a, diversity_a, reward_b, diversity_b)]
    shape = arrays[0].shape
    # Each curve may have its own number of strengths; seeds (paired) and prompts must match.
    if (
        len(shape) != 3
        or any(x.ndim != 3 for x in arrays)
        or arrays[1].shape != shape
        or arrays[3].shape != arrays[2].shape
        or arrays[2].shape[0] != shape[0]
        or arrays[2].shape[2] != shape[2]
    ):
        raise ValueError(
            "frontier values must be [seeds, strengths, prompts], reward and diversity of one curve of one shape, "
            f"both curves with the same seeds and prompts; got {[x.shape for x in arrays]}"
        )
    if min(shape[1], arrays[2].shape[1]) < 2:
        raise ValueError("a frontier needs at least 2 regularisation strengths")
    if not all(np.isfinite(x).all() for x in arrays):
        raise ValueError("frontier values must be finite")
    r_a, d_a, r_b, d_b = arrays
    seeds, _, prompts = shape
    levels_at = common_levels(r_a.mean(2), r_b.mean(2), levels, d_a.mean(2), d_b.mean(2))
    if levels_at is None:
        return {
            "verdict": "no overlap",
            "levels": [],
            "seeds": seeds,
            "prompts": prompts,
            "note": "the divergences' reward ranges do not overlap in every seed: no comparison at equal reward",
        }

    def gaps(idx_p):
        mean = lambda x: x[:, :, idx_p].mean(2)  # noqa: E731  [S, G]
        return curve_at(mean(r_b), mean(d_b), levels_at) - curve_at(mean(r_a), mean(d_a), levels_at)  # [S, L]

    point = gaps(np.arange(prompts))
    seed_idx, prompt_idx = draws(seeds, prompts, n_boot, rng_seed)
    reps = np.stack([gaps(p)[s] for s, p in zip(seed_idx, prompt_idx)])  # [n_boot, S, L]
    per_level = reps.mean(1)  # [n_boot, L]
    overall = per_level.mean(1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(overall, [tail, 1 - tail])
    level_lo, level_hi = np.quantile(per_level, [tail, 1 - tail], axis=0)
    if lo > 0 and not (level_hi < 0).any():
        verdict = "b dominates"
    elif hi < 0 and not (level_lo > 0).any():
        verdict = "a dominates"
    else:
        verdict = "tie"
    per_seed = point.mean(1)
    return {
        "verdict": verdict,
        "mean_gap": float(point.mean()),
        "se": float(overall.std(ddof=1)),
        "ci": [float(lo), float(hi)],
        "levels": levels_at.tolist(),
        "gap_at_level": point.mean(0).tolist(),
        "ci_at_level": [[float(a), float(b)] for a, b in zip(level_lo, level_hi)],
        "gap_per_seed": per_seed.tolist(),
        "seeds_positive": int((per_seed > 0).sum()),
        "sign_flip_p": sign_flip_p(per_seed),
        "seeds": seeds,
        "prompts": prompts,
        "n_boot": n_boot,
        "confidence": level,
    }


def fmt(estimate: dict | Estimate, digits: int = 3, signed: bool = False) -> str:
    """``mean ± se`` of an estimate (its dict form too)."""
    e = estimate.as_dict() if isinstance(estimate, Estimate) else estimate
    sign = "+" if signed else ""
    if not math.isfinite(e["mean"]):
        return "-"
    return f"{e['mean']:{sign}.{digits}f} ± {e['se']:.{digits}f}"


# ---------------------------------------------------------------- over seeds: t intervals, equivalence, power
# With a handful of seeds the two-level bootstrap above is narrower than a t-interval on the per-seed values (it
# cannot know that 5 draws understate the spread); these give the seed-level reading beside it.


def t_cdf(t: float, df: int) -> float:
    """Student's t distribution function for an integer ``df`` >= 1 (closed form, Abramowitz & Stegun 26.7.3-4)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be an integer >= 1; got {df!r}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, term = math.cos(theta) ** 2, 1.0
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2.4/(3.5) cos^4 + ...))
        total = 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        inside = (2 / math.pi) * (theta + math.sin(theta) * math.cos(theta) * total)
    else:  # even: sin (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ...)
        total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        inside = math.sin(theta) * total
    return 0.5 + math.copysign(inside / 2, t)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with integer ``df`` (bisection on :func:`t_cdf`)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1); got {p!r}")
    low, high = -1e6, 1e6
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def _per_seed(values) -> np.ndarray:
    values = np.asarray(values, float)
    if values.ndim != 1 or len(values) < 2 or not np.isfinite(values).all():
        raise ValueError(f"per-seed values must be a finite 1-d array of at least 2; got shape {values.shape}")
    return values


def t_interval(values, level: float = 0.95) -> dict:
    """Mean of per-seed values with the two-sided t-interval over seeds (n - 1 degrees of freedom)."""
    values = _per_seed(values)
    n = len(values)
    se = float(values.std(ddof=1) / math.sqrt(n))
    half = t_quantile(1 - (1 - level) / 2, n - 1) * se
    mean = float(values.mean())
    return {"mean": mean, "se": se, "ci": [mean - half, mean + half], "df": n - 1, "level": level}


def one_sided_t(values, alternative: str = "less") -> dict:
    """One-sample t-test of mean 0 over seeds against ``alternative`` "less" (mean < 0) or "greater"."""
    values = _per_seed(values)
    if alternative not in ("less", "greater"):
        raise ValueError(f"alternative must be 'less' or 'greater'; got {alternative!r}")
    n = len(values)
    t = float(values.mean() / (values.std(ddof=1) / math.sqrt(n)))
    cdf = t_cdf(t, n - 1)
    return {"t": t, "df": n - 1, "p": cdf if alternative == "less" else 1 - cdf, "alternative": alternative}


def equivalence(values, margin: float, alpha: float = 0.05) -> dict:
    """TOST over seeds: the mean is within ``±margin`` of 0 at level ``alpha`` when the ``1 - 2 alpha`` (90%)
    t-interval lies inside ``(-margin, margin)``."""
    if not margin > 0:
        raise ValueError(f"margin must be > 0; got {margin!r}")
    ci = t_interval(values, 1 - 2 * alpha)
    return {**ci, "margin": margin, "equivalent": bool(-margin < ci["ci"][0] and ci["ci"][1] < margin)}


def detectable(se: float, df: int | None = None, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable effect of a two-sided test at ``alpha`` with ``power``: (q(1 - alpha/2) + q(power)) x se,
    q the normal quantile, or Student's t with ``df`` (the usual approximation to the noncentral t)."""
    if df is None:
        from statistics import NormalDist

        q = NormalDist().inv_cdf
        return (q(1 - alpha / 2) + q(power)) * se
    return (t_quantile(1 - alpha / 2, df) + t_quantile(power, df)) * se
