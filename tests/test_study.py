"""The divergence study v2: statistics on synthetic numbers with known answers, the attribute spreads, noisy labels,
a tiny resumable frontier and the generated doc tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fdpo_study import bootstrap as stats
from fdpo_study import frontier as frontier_mod
from fdpo_study import reward_model, task
from fdpo_study import study_report as report
from fdpo_study.cli import main as cli_main
from fdpo_study.frontier import FrontierConfig, run_frontier, summarise
from fdpo_study.study import (
    BASE_PIPELINE,
    NOVEL_BASE,
    check_label_temperature,
    label_agreement,
    make_pairs,
    markdown_table,
    prompt_groups,
)

# ---------------------------------------------------------------- statistics


def test_bootstrap_constant_and_mean():
    e = stats.bootstrap(np.full((3, 5), 0.25), n_boot=200)
    assert (e.mean, e.se, e.low, e.high) == (0.25, 0.0, 0.25, 0.25)
    values = np.arange(12.0).reshape(3, 4)
    e = stats.bootstrap(values, n_boot=500)
    assert e.mean == pytest.approx(5.5) and e.low < 5.5 < e.high and e.se > 0
    assert (e.seeds, e.prompts) == (3, 4)
    one_seed = stats.bootstrap(np.arange(4.0), n_boot=200)  # [P]: one seed, over prompts only
    assert one_seed.seeds == 1 and one_seed.mean == pytest.approx(1.5)


def test_bootstrap_covers_seed_variance():
    # Seeds differ by a lot, prompts not at all: the interval must reflect the seeds.
    values = np.array([[0.0] * 6, [1.0] * 6, [2.0] * 6, [3.0] * 6])
    e = stats.bootstrap(values, n_boot=2000)
    assert e.se == pytest.approx(np.std([0, 1, 2, 3]) / 2, rel=0.1)  # std of the mean of 4 draws
    prompts_only = stats.bootstrap(values.T, n_boot=500)  # the same numbers as prompts of 6 seeds
    assert prompts_only.mean == e.mean


def test_paired_difference_and_errors():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(5, 10))
    e = stats.paired(b + 0.1, b, n_boot=300)
    assert e.mean == pytest.approx(0.1) and e.low == pytest.approx(0.1) and e.significant == 1
    assert stats.paired(b, b + 0.1, n_boot=300).significant == -1
    with pytest.raises(ValueError, match="same"):
        stats.paired(b, b[:, :3])
    with pytest.raises(ValueError, match="finite"):
        stats.bootstrap([[1.0, float("nan")]])


def test_pareto_flags_respect_noise():
    rng = np.random.default_rng(1)
    noise = lambda: rng.normal(0, 0.05, size=(5, 30))  # noqa: E731
    rewards = [0.8 + 0 * noise(), 0.5 + 0 * noise(), 0.6 + 0 * noise(), 0.8 + noise()]
    diversity = [0.2 + 0 * noise(), 0.4 + 0 * noise(), 0.1 + 0 * noise(), 0.2 - 0.001 + noise()]
    rewards[3] = rewards[3] - rewards[3].mean() + 0.8 - 0.001  # below model 0 by 0.001 in both: within noise
    diversity[3] = diversity[3] - diversity[3].mean() + 0.2 - 0.001
    assert stats.pareto_flags(rewards, diversity, n_boot=300) == ["yes", "yes", "no", "tie"]


def test_curve_and_levels():
    r = np.array([0.3, 0.1, 0.2])  # unsorted: read sorted by reward
    d = np.array([0.1, 0.3, 0.2])
    assert stats.curve_at(r, d, np.array([0.15, 0.25])) == pytest.approx([[0.25, 0.15]][0])
    assert stats.common_levels(np.array([[0.0, 1.0]]), np.array([[2.0, 3.0]])) is None
    levels = stats.common_levels(np.array([[0.0, 1.0], [0.2, 0.8]]), np.array([[0.1, 0.9]]), count=3)
    assert levels == pytest.approx([0.3, 0.5, 0.7])


def test_frontier_skips_dominated_points():
    # An over-optimised point (less reward and less diversity than another) is not on the frontier.
    r, d = np.array([0.5, 0.6, 0.7, 0.65]), np.array([0.3, 0.2, 0.1, 0.05])
    assert stats.front_mask(r, d).tolist() == [True, True, True, False]
    assert stats.curve_at(r, d, np.array([0.66])) == pytest.approx([0.14])
    levels = stats.common_levels(
        np.array([[0.5, 0.9, 0.6]]), np.array([[0.5, 0.8]]), 1, np.array([[0.3, 0.2, 0.1]]), np.array([[0.3, 0.2]])
    )
    assert levels == pytest.approx([0.65])  # the 0.6 point is dominated: the front covers 0.5-0.9


def test_sign_flip_p():
    assert stats.sign_flip_p([1, 2, 3, 4, 5]) == pytest.approx(2 / 32)
    assert stats.sign_flip_p([1, -1]) == 1.0


def _curves(gap: float, noise: float = 0.0, seeds: int = 5, prompts: int = 20, slope: float = -0.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    gammas = np.linspace(0.5, 0.7, 5)
    reward = np.broadcast_to(gammas[None, :, None], (seeds, 5, prompts)) + rng.normal(0, noise, (seeds, 5, prompts))
    diversity_a = 0.6 + slope * reward + rng.normal(0, noise, (seeds, 5, prompts))
    reward_b = reward + rng.normal(0, noise, (seeds, 5, prompts))
    diversity_b = 0.6 + slope * reward_b + gap + rng.normal(0, noise, (seeds, 5, prompts))
    return reward, diversity_a, reward_b, diversity_b


def test_frontier_gap_known_answers():
    out = stats.frontier_gap(*_curves(0.05), n_boot=200)
    assert out["verdict"] == "b dominates" and out["mean_gap"] == pytest.approx(0.05)
    assert out["seeds_positive"] == 5 and out["sign_flip_p"] == pytest.approx(2 / 32)
    r_a, d_a, r_b, d_b = _curves(0.05)
    assert stats.frontier_gap(r_b, d_b, r_a, d_a, n_boot=200)["verdict"] == "a dominates"
    tie = stats.frontier_gap(*_curves(0.0, noise=0.02, seed=3), n_boot=300)
    assert tie["verdict"] == "tie" and tie["ci"][0] < 0 < tie["ci"][1]
    # Curves that cross: b above at low reward, below at high reward.
    r_a, d_a, _, _ = _curves(0.0)
    crossing = stats.frontier_gap(r_a, d_a, r_a, 0.6 - 1.5 * r_a + 0.6, n_boot=200)
    assert crossing["verdict"] == "tie"
    far = stats.frontier_gap(r_a, d_a, r_a + 1.0, d_a, n_boot=50)
    assert far["verdict"] == "no overlap"
    with pytest.raises(ValueError, match="2 regularisation"):
        stats.frontier_gap(r_a[:, :1], d_a[:, :1], r_a[:, :1], d_a[:, :1])


def test_frontier_gap_resamples_prompts_paired():
    """Each prompt's own diversity, shared by both divergences, is far larger than their gap: drawing the same
    prompts for both (paired) sees b exactly 0.01 above a in every draw; drawing them independently would not."""
    rng = np.random.default_rng(0)
    seeds, prompts = 3, 40
    gammas = np.linspace(0.5, 0.7, 5)
    reward = np.broadcast_to(gammas[None, :, None], (seeds, 5, prompts)) + rng.normal(0, 0.01, (seeds, 5, prompts))
    diversity_a = 0.6 - 0.5 * reward + rng.normal(0, 1.0, (1, 1, prompts))
    out = stats.frontier_gap(reward, diversity_a, reward, diversity_a + 0.01, n_boot=200)
    assert out["verdict"] == "b dominates" and out["ci"] == pytest.approx([0.01, 0.01], abs=1e-9)


def test_t_distribution_known_answers():
    # Tabulated quantiles, and closed forms: df 1 is Cauchy (0.5 + atan(t) / pi); df 2 is 0.5 + t / (2 sqrt(2 + t^2)).
    for p, df, q in ((0.975, 4, 2.776445), (0.95, 4, 2.131847), (0.8, 4, 0.940965), (0.975, 9, 2.262157)):
        assert stats.t_quantile(p, df) == pytest.approx(q, abs=1e-6)
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75) and stats.t_cdf(0.0, 3) == 0.5
    assert stats.t_cdf(2.0, 2) == pytest.approx(0.5 + 1 / 6**0.5) and stats.t_cdf(-2.0, 2) == pytest.approx(
        0.5 - 1 / 6**0.5
    )
    assert stats.t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-5)
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.t_cdf(1.0, 0)


def test_t_interval_equivalence_and_one_sided_known_answers():
    # 1..5: mean 3, SD sqrt(2.5), s.e. sqrt(0.5); 95% half-width 2.776445 x 0.707107 = 1.963243.
    e = stats.t_interval([1, 2, 3, 4, 5])
    assert e["mean"] == 3 and e["ci"] == pytest.approx([3 - 1.963243, 3 + 1.963243], abs=1e-6) and e["df"] == 4
    # TOST: mean 0, s.e. 0.0070711; 90% interval +-2.131847 x 0.0070711 = +-0.015075: inside +-0.02, not +-0.015.
    values = [-0.01, 0.01, 0.0, 0.02, -0.02]
    inside, outside = stats.equivalence(values, 0.02), stats.equivalence(values, 0.015)
    assert inside["ci"] == pytest.approx([-0.015075, 0.015075], abs=1e-6) and inside["level"] == pytest.approx(0.9)
    assert inside["equivalent"] and not outside["equivalent"]
    assert not stats.equivalence([0.03, 0.031, 0.029], 0.02)["equivalent"]  # tight but off 0: not equivalent
    # t = -3 sqrt(2) with 4 df: cos^2 = 4 / 22, sin = sqrt(18 / 22); P(T < t) = (1 - sin (1 + cos^2 / 2)) / 2.
    low = stats.one_sided_t([-1, -2, -3, -4, -5], "less")
    assert low["t"] == pytest.approx(-3 * 2**0.5) and low["p"] == pytest.approx(
        (1 - (18 / 22) ** 0.5 * (1 + 2 / 22)) / 2
    )
    assert stats.one_sided_t([-1, -2, -3, -4, -5], "greater")["p"] == pytest.approx(1 - low["p"])
    with pytest.raises(ValueError, match="at least 2"):
        stats.t_interval([1.0])
    with pytest.raises(ValueError, match="margin"):
        stats.equivalence(values, 0.0)


def test_minimum_detectable_effect_known_answers():
    # (z(0.975) + z(0.80)) x s.e. = (1.959964 + 0.841621) x s.e.; with 4 df (2.776445 + 0.940965) x s.e.
    assert stats.detectable(0.0056) == pytest.approx(2.801585 * 0.0056, rel=1e-6)
    assert stats.detectable(0.0056, df=4) == pytest.approx(3.717410 * 0.0056, rel=1e-6)
    assert stats.detectable(1.0, df=4, power=0.5) == pytest.approx(2.776445, abs=1e-6)  # q(0.5) = 0


# ---------------------------------------------------------------- task: attribute spread, labels


def test_attribute_spread_separates_object_and_background():
    spec = task.Spec("red", "circle", "small", "center")
    g = torch.Generator().manual_seed(0)
    one = task.render([spec], g)
    same = one.repeat(4, 1, 1, 1)[None]
    spread = task.attribute_spread(same)
    assert all(spread[k].item() == pytest.approx(0.0, abs=1e-6) for k in task.ATTRIBUTES)
    # Only the background changes: the object's attributes do not spread, the background does.
    cover = (one - one[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.05
    backgrounds = torch.stack([torch.where(cover, one, torch.full_like(one, v))[0] for v in (0.05, 0.2, 0.35, 0.5)])
    spread = task.attribute_spread(backgrounds[None])
    assert spread["background"].item() > 0.2
    # (the detector's soft weight of anti-aliased edge pixels moves a little with the contrast to the background)
    assert spread["position"].item() < 0.02 and spread["size"].item() < 0.15 and spread["colour"].item() < 0.1
    # Only the position changes: position spreads, the background does not.
    moved = torch.stack([torch.roll(one[0], s, dims=2) for s in (-3, -1, 1, 3)])
    spread = task.attribute_spread(moved[None])
    assert spread["position"].item() > 0.1 and spread["background"].item() < 1e-6
    with pytest.raises(ValueError, match="at least 2"):
        task.attribute_spread(one[None])


def test_reward_uses_the_detector():
    g = torch.Generator().manual_seed(1)
    specs = list(task.ALL_SPECS[:8])
    images = task.render(specs, g)
    det = task.detect(images)
    scores = task.reward(images, specs)
    assert torch.equal(scores["style"], (1 - det["background"].mean(1) / task.STYLE_DARKEST_PREFERRED).clamp(0, 1))
    assert det["found"].all() and scores["reward"].min() > 0.5  # rendered ground truth scores well


def test_label_temperature(tmp_path):
    import pyarrow.parquet as pq

    from fdiv_kernels.train.model import load_pipeline

    pipe = load_pipeline(BASE_PIPELINE)
    tables = {}
    for name, t in (("hard", 0.0), ("cold", 1e-9), ("hot", 1e6), ("mid", 0.05), ("mid2", 0.05)):
        make_pairs(pipe, tmp_path / name, 24, 0, 2, progress=False, label_temperature=t)
        tables[name] = pq.read_table(tmp_path / name / "pairs.parquet").to_pydict()
    hard = np.array(tables["hard"]["label_0"])
    r0, r1 = np.array(tables["hard"]["reward_0"]), np.array(tables["hard"]["reward_1"])
    assert (hard == np.where(r0 > r1, 1.0, np.where(r0 < r1, 0.0, 0.5))).all()
    assert tables["cold"]["label_0"] == tables["hard"]["label_0"]  # same images, temperature -> 0
    assert tables["mid"]["label_0"] == tables["mid2"]["label_0"]  # seeded
    assert set(tables["hot"]["label_0"]) <= {0.0, 1.0} and tables["hot"]["p_label_0"] == pytest.approx([0.5] * 24)
    p = np.array(tables["mid"]["p_label_0"])
    assert p == pytest.approx(1 / (1 + np.exp(-(r0 - r1) / 0.05)), rel=1e-5)
    for bad in (-1.0, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="--label-temperature"):
            check_label_temperature(bad)
    agreement = {name: label_agreement(tmp_path / name)["agreement_with_reward"] for name in tables}
    assert agreement["hard"] == agreement["cold"] == 1.0 and agreement["hot"] < 1.0
    assert label_agreement(tmp_path / "mid")["labeller"] == "task reward"


def _rendered_pairs(n: int, seed: int):
    """Pairs of one prompt's rendering and another prompt's (in random order), labelled by the task reward."""
    g = torch.Generator().manual_seed(seed)
    specs = [task.ALL_SPECS[i] for i in torch.randint(len(task.ALL_SPECS), (n,), generator=g)]
    others = [task.ALL_SPECS[i] for i in torch.randint(len(task.ALL_SPECS), (n,), generator=g)]
    right, wrong = task.render(specs, g), task.render(others, g)
    swap = (torch.rand(n, generator=g) < 0.5)[:, None, None, None]
    x0, x1 = torch.where(swap, wrong, right), torch.where(swap, right, wrong)
    r0, r1 = task.reward(x0, specs)["reward"], task.reward(x1, specs)["reward"]
    return x0, x1, [s.caption for s in specs], (r0 > r1).float()


def test_reward_model_learns_the_task_reward_from_labelled_pairs():
    x0, x1, captions, labels = _rendered_pairs(512, 0)
    model = reward_model.fit(x0, x1, captions, labels, seed=0, steps=300)
    y0, y1, held_captions, held_labels = _rendered_pairs(512, 1)
    predicted = (reward_model.score(model, y0, held_captions) > reward_model.score(model, y1, held_captions)).float()
    assert (predicted == held_labels).float().mean() > 0.75  # chance is 0.5; 0.93 measured
    quick = [reward_model.fit(x0[:8], x1[:8], captions[:8], labels[:8], seed=3, steps=2) for _ in range(2)]
    assert torch.equal(*(reward_model.score(m, y0[:8], held_captions[:8]) for m in quick))  # seeded
    with pytest.raises(ValueError, match="as many"):
        reward_model.fit(x0[:3], x1[:2], captions[:3], labels[:3], seed=0)
    with pytest.raises(ValueError, match="'purple'"):
        reward_model.score(model, y0[:1], ["a small purple circle at the top"])


def test_make_pairs_labelled_by_a_learned_reward_model(tmp_path, monkeypatch):
    import functools

    import pyarrow.parquet as pq

    from fdiv_kernels.train.model import load_pipeline

    monkeypatch.setattr(reward_model, "fit", functools.partial(reward_model.fit, steps=3))
    make_pairs(load_pipeline(BASE_PIPELINE), tmp_path / "p", 8, 0, 2, progress=False, reward_model_pairs=16)
    table = pq.read_table(tmp_path / "p" / "pairs.parquet").to_pydict()
    l0, l1, label = (np.array(table[k]) for k in ("learned_reward_0", "learned_reward_1", "label_0"))
    assert (label == np.where(l0 > l1, 1.0, np.where(l0 < l1, 0.0, 0.5))).all()
    assert table["reward_model_pairs"] == [16] * 8 and len(table["reward_0"]) == 8
    stats_ = label_agreement(tmp_path / "p")
    assert stats_["labeller"] == "learned reward model (16 pairs)" and 0 <= stats_["agreement_with_reward"] <= 1
    with pytest.raises(ValueError, match="--reward-model-pairs"):
        make_pairs(None, tmp_path / "q", 8, 0, 2, reward_model_pairs=-1)
    assert not (tmp_path / "q").exists()


# ---------------------------------------------------------------- the frontier


TINY = dict(pairs=8, sampling_steps=2, steps=2, batch_size=4, eval_prompts=3, eval_samples=2, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"divergences": ("reverse_kl", "chi2")}, "--divergences"),
        ({"divergences": ("js", "js")}, "repeated"),
        ({"gammas": (1.0,)}, "at least 2"),
        ({"gammas": (1.0, -2.0)}, "--gammas"),
        ({"gammas": (1.0, 1.0)}, "repeated"),
        ({"seeds": ()}, "at least one"),
        ({"seeds": (0, -1)}, "--seeds"),
        ({"eval_samples": 1}, "--eval-samples"),
        ({"eval_prompts": 37}, "--eval-prompts"),
        ({"label_temperature": -0.1}, "--label-temperature"),
        ({"beta": 0.0}, "--beta"),
    ],
)
def test_frontier_config_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FrontierConfig(output=tmp_path / "f", **kwargs)
    assert not (tmp_path / "f").exists()


def test_frontier_cli_errors(tmp_path, capsys):
    for argv, match in (
        (["study", "--gammas", "1,3"], "--gammas needs --frontier"),
        (["study", "--frontier", "--gammas", "1,x", "--output", str(tmp_path / "f")], "--gammas"),
        (["study", "--frontier", "--gamma", "3", "--output", str(tmp_path / "f")], "--gammas"),
        (["study", "--frontier", "--divergences", "js,tv", "--output", str(tmp_path / "f")], "tv"),
        (["study", "--label-temperature", "-1", "--output", str(tmp_path / "s")], "--label-temperature"),
    ):
        with pytest.raises(SystemExit) as exit_:
            cli_main(argv)
        assert exit_.value.code == 2 and match in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def _base_without(tmp_path, specs) -> Path:
    """The shipped base, recorded as pretrained without ``specs`` (the prompt groups need only the record)."""
    base = tmp_path / "base"
    shutil.copytree(BASE_PIPELINE, base)
    record = json.loads((base / "pretraining.json").read_text())
    record["prompts_held_out"] = sorted(s.caption for s in specs)
    (base / "pretraining.json").write_text(json.dumps(record))
    return base


def test_tiny_frontier_resumes(tmp_path, monkeypatch):
    base = _base_without(tmp_path, task.novel_specs())
    cfg = FrontierConfig(
        output=tmp_path / "f", divergences=("reverse_kl", "js"), gammas=(1.0, 30.0), seeds=(0, 1), base=base, **TINY
    )
    summary = run_frontier(cfg)
    results = sorted(p.name for p in (tmp_path / "f" / "results").glob("*.json"))
    assert len(results) == 2 + 2 * 2 * 2 and "js_g30_s1.json" in results
    assert summary["complete_seeds"] == [0, 1] and len(summary["rows"]) == 1 + 2 * 2
    row = summary["rows"][1]
    assert {"reward", "pairwise_distance", "vendi", "object_spread", "background_spread"} <= set(row)
    assert row["reward"]["seeds"] == 2 and row["reward"]["prompts"] == 3
    assert {r["pareto"] for r in summary["rows"]} <= {"yes", "no", "tie"}
    assert set(summary["frontiers"]) >= {"js vs reverse_kl: pairwise_distance"}
    assert (tmp_path / "f" / "frontier.png").is_file() and "| model |" in (tmp_path / "f" / "frontier.md").read_text()
    assert not (tmp_path / "f" / "work").exists()
    # The first 3 held-out prompts: 2 novel to this base, 1 seen; each group's statistics over its own prompts.
    groups = summary["prompt_groups"]
    novel = {s.caption for s in task.novel_specs()}
    assert [set(g["prompts"]) <= novel for g in groups.values()] == [False, True]
    assert [len(g["prompts"]) for g in groups.values()] == [1, 2]
    first = json.loads((tmp_path / "f" / "results" / "js_g30_s0.json").read_text())["metrics"]["reward"]["per_prompt"]
    second = json.loads((tmp_path / "f" / "results" / "js_g30_s1.json").read_text())["metrics"]["reward"]["per_prompt"]
    js30 = next(i for i, r in enumerate(summary["rows"]) if r["model"] == "js gamma 30")
    assert groups["seen"]["rows"][js30]["reward"]["mean"] == pytest.approx((first[2] + second[2]) / 2)
    assert groups["novel"]["rows"][js30]["reward"]["mean"] == pytest.approx(np.mean(first[:2] + second[:2]))
    assert set(groups["novel"]["frontiers"]) == set(summary["frontiers"])
    assert "By prompt group (1 seen and 2 novel)" in (tmp_path / "f" / "frontier.md").read_text()
    # A killed run: one result missing and a half-trained model left behind. Only that model is trained again.
    kept = json.loads((tmp_path / "f" / "results" / "reverse_kl_g1_s0.json").read_text())
    (tmp_path / "f" / "results" / "js_g1_s1.json").unlink()
    (tmp_path / "f" / "work" / "js_g1_s1").mkdir(parents=True)
    (tmp_path / "f" / "work" / "js_g1_s1" / "partial").write_text("x")
    calls = []
    real_train = frontier_mod.train
    monkeypatch.setattr(frontier_mod, "train", lambda c: calls.append(c.output.name) or real_train(c))
    run_frontier(cfg)
    assert calls == ["js_g1_s1"]
    assert json.loads((tmp_path / "f" / "results" / "reverse_kl_g1_s0.json").read_text()) == kept
    # A second writer of the same folder is refused while the first holds it.
    import fcntl
    import os

    fd = os.open(tmp_path / "f", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(FileExistsError, match="another process"):
            run_frontier(cfg)
    finally:
        os.close(fd)
    # Other settings into the same folder are refused before anything runs.
    with pytest.raises(ValueError, match="steps"):
        run_frontier(
            FrontierConfig(output=tmp_path / "f", gammas=(1.0, 30.0), seeds=(0, 1), base=base, **{**TINY, "steps": 3})
        )
    with pytest.raises(ValueError, match="base"):
        run_frontier(FrontierConfig(output=tmp_path / "f", gammas=(1.0, 30.0), seeds=(0, 1), **TINY))
    # The report from the same results, without training.
    again = summarise(cfg, n_boot=100)
    assert again["complete_seeds"] == [0, 1]
    assert "none detected" in report.frontier_tables(again) or "dominates" in report.frontier_tables(again)


def test_frontier_records_shipped_bases_relative_to_the_package(tmp_path):
    assert frontier_mod.portable_path(BASE_PIPELINE) == "fdpo_study/assets/base"
    assert frontier_mod.portable_path(NOVEL_BASE) == "fdpo_study/assets/base_novel"
    assert frontier_mod.portable_path(tmp_path / "b") == str((tmp_path / "b").resolve())
    recorded = json.loads((report.RESULTS / "frontier" / "frontier_config.json").read_text())
    assert recorded == FrontierConfig(output=tmp_path / "f").shared()  # the committed run resumes from any checkout


def test_prompt_groups_and_the_study_table():
    captions = [s.caption for s in task.split_specs()[1][:3]]
    assert prompt_groups(BASE_PIPELINE, captions) == {}
    assert prompt_groups(NOVEL_BASE, captions) == {"seen": [2], "novel": [0, 1]}
    rng = np.random.default_rng(3)

    def metric(values):
        return {"mean": float(np.mean(values)), "se": 0.01, "per_prompt": list(values)}

    rows = [
        {
            "model": name,
            **{k: metric(rng.uniform(size=4)) for k in ("reward", "fidelity", "style", "pairwise_distance", "vendi")},
            "pareto": "yes",
            **({"final_train": {"implicit_acc": 0.7}} if name != "base" else {}),
        }
        for name in ("base", "reverse_kl", "js")
    ]
    results = {
        "rows": rows,
        "eval_prompts": ["p"] * 4,
        "prompt_groups": {"seen": [0, 3], "novel": [1, 2]},
        "paired_vs_reverse_kl": [],
        "config": {
            "eval_samples": 2,
            "sampling_steps": 2,
            "pairs": 8,
            "steps": 2,
            "batch_size": 4,
            "learning_rate": 1e-5,
            "beta": 500.0,
            "gamma": 10.0,
            "seed": 0,
        },
        "timings_s": {"total": 1.0},
    }
    table = markdown_table(results)
    assert "By prompt group (2 seen, 2 novel)" in table
    js = rows[2]
    novel_reward = np.mean([js["reward"]["per_prompt"][i] for i in (1, 2)])
    seen_distance = np.mean([js["pairwise_distance"]["per_prompt"][i] for i in (0, 3)])
    line = next(line for line in table.splitlines() if line.startswith("| js |") and line.count("|") == 6)
    assert f"{novel_reward:.3f} ± " in line.split("|")[3] and f"{seen_distance:.3f} ± " in line.split("|")[4]


# ---------------------------------------------------------------- generated docs


def test_splice_and_blocks(tmp_path):
    text = "a\n<!-- study:x:begin -->\nold 1.23\n<!-- study:x:end -->\nb\n"
    out = report.splice(text, "x", "new")
    assert out.startswith("a\n<!-- study:x:begin -->\n") and "new" in out and "old" not in out and out.endswith("b\n")
    assert report.splice(out, "x", "new") == out
    with pytest.raises(ValueError, match="study:y"):
        report.splice(text, "y", "z")
    blocks = report.blocks()
    study = json.loads((report.RESULTS / "study.json").read_text())
    js = next(r for r in study["rows"] if r["model"] == "js")
    assert f"{js['reward']['mean']:.3f}" in blocks["table"]
    assert "bit-for-bit" in blocks["findings"] and "not bit-for-bit" in blocks["findings"]


def test_committed_docs_are_generated():
    assert report.regenerate(check=True) == []


def _summary(per_seed_gaps: list[float], se: float = 0.005, distances=(0.1, 0.2)) -> dict:
    """A frontier summary with one pairwise-distance gap and models spanning ``distances``."""
    gap = {
        "verdict": "tie",
        "mean_gap": float(np.mean(per_seed_gaps)),
        "se": se,
        "ci": [-0.01, 0.01],
        "levels": [0.6, 0.62],
        "gap_per_seed": per_seed_gaps,
        "seeds_positive": sum(g > 0 for g in per_seed_gaps),
        "seeds": len(per_seed_gaps),
        "sign_flip_p": 1.0,
    }
    rows = [
        {"model": m, "reward": {"mean": r}, "pairwise_distance": {"mean": d}}
        for m, r, d in (("base", 0.5, distances[1]), ("x", 0.7, distances[0]))
    ]
    return {"rows": rows, "frontiers": {"js vs reverse_kl: pairwise_distance": gap}}


def test_tie_reading_equivalence_margin_and_power():
    tight = _summary([-0.001, 0.001, 0.0, 0.002, -0.002])
    assert report.margins(tight) == {"pairwise_distance": pytest.approx(0.01)}  # a tenth of 0.2 - 0.1
    reading = report.gap_reading(tight["frontiers"]["js vs reverse_kl: pairwise_distance"], 0.01)
    assert reading["equivalence"]["equivalent"] and reading["detectable"] == pytest.approx(3.717410 * 0.005, rel=1e-6)
    line = report._gap_table(tight["frontiers"], report.margins(tight))[2]
    assert "**none detected**" in line and "yes, ±0.0100" in line and f"{3.717410 * 0.005:.4f}" in line
    wide = _summary([-0.02, 0.02, 0.0, 0.03, -0.03])
    assert "not shown, ±0.0100" in report._gap_table(wide["frontiers"], report.margins(wide))[2]
    # Pooled: the per-seed gaps of both, at the smaller margin (0.01 here, 0.02 for the second).
    pooled = report.pooled_equivalence([tight, _summary([0.001, -0.001, 0.0], distances=(0.0, 0.2))])
    assert pooled["seeds"] == 8 and pooled["margin"] == pytest.approx(0.01) and pooled["equivalent"]


def test_seed_spread_of_the_committed_frontier():
    # JS - reverse KL at gamma 10 over the frontier's 5 seeds (the review's numbers: SD 0.014 and 0.014).
    spread = report.seed_spread(report.RESULTS)
    assert spread["seeds"] == [0, 1, 2, 3, 4]
    assert spread["reward"]["sd"] == pytest.approx(0.014, abs=5e-4) and spread["reward"]["mean"] == pytest.approx(
        -0.010, abs=5e-4
    )
    assert spread["pairwise_distance"]["sd"] == pytest.approx(0.014, abs=5e-4)
    assert "SD 0.014 in reward" in report.spread_note(spread)
    blocks = report.blocks()
    assert "SD 0.014 in reward" in blocks["table"] and "seed SD" in blocks["labels"]
    assert "JS minus Hellinger paired directly" in blocks["findings"]


def _confirm_folder(tmp_path, style_gap: float, reward_gap: float = 0.0, seeds=(5, 6, 7, 8, 9)) -> Path:
    """Results of the pre-registered grid with JS - reverse KL style ``style_gap`` (plus per-seed noise)."""
    folder = tmp_path / "frontier_confirm"
    (folder / "results").mkdir(parents=True)
    settings = FrontierConfig(output=folder).shared()
    rng = np.random.default_rng(0)
    for seed in seeds:
        noise = rng.normal(0, 0.002)
        for gamma in report.CONFIRM["gammas"]:
            for divergence in ("js", "reverse_kl"):
                js = divergence == "js"
                base = {"reward": 0.6, "fidelity": 0.6, "style": 0.5, "pairwise_distance": 0.2}
                if js:
                    base = {**base, "style": 0.5 + style_gap + noise, "reward": 0.6 + reward_gap + noise / 10}
                metrics = {k: {"per_prompt": list(v + rng.normal(0, 0.002, 6))} for k, v in base.items()}
                record = {"settings": settings, "metrics": metrics}
                (folder / "results" / f"{divergence}_g{gamma:g}_s{seed}.json").write_text(json.dumps(record))
    return folder


def test_preregistered_confirmation_reads_the_runs(tmp_path):
    assert report.confirm_block(tmp_path / "absent").startswith("Not run yet: 0 of the 5")
    held = report.confirm_block(_confirm_folder(tmp_path / "a", -0.05))
    assert "**confirmed**" in held and "-> held at alpha 0.05" in held and "reward" in held
    style_row = next(line for line in held.splitlines() if line.startswith("| 1 | style |"))
    assert float(style_row.split("|")[3]) == pytest.approx(-0.05, abs=0.003) and "| 5/5 |" in style_row
    unequal = report.confirm_block(_confirm_folder(tmp_path / "b", -0.05, reward_gap=0.05))
    assert "**lower style, but not at equal reward**" in unequal and "not met" in unequal
    null = report.confirm_block(_confirm_folder(tmp_path / "c", 0.05))
    assert "**not confirmed**" in null and "not tested" in null
    partial = report.confirm_block(_confirm_folder(tmp_path / "d", -0.05, seeds=(5, 6)))
    assert partial.startswith("Not run yet: 2 of the 5")


# ---------------------------------------------------------------- committed results against today's code


def test_fingerprint_differences_known_answers():
    from fdpo_study import fingerprint

    recorded = {"sizes": {"pairs": 2}, "runs": [], "models": {"js": {"reward": 0.5, "style": 0.25}}}
    same = {**recorded, "models": {"js": {"reward": 0.5 * (1 + 1e-7), "style": 0.25}}}
    assert fingerprint.differences(recorded, same) == []
    moved = {**recorded, "models": {"js": {"reward": 0.5001, "style": 0.25}}}
    assert fingerprint.differences(recorded, moved) == ["js reward: 0.5 -> 0.5001"]
    assert fingerprint.differences(recorded, {**recorded, "sizes": {"pairs": 3}})[0].startswith("sizes")


def test_committed_results_match_the_code():
    """results/study/ was made by today's code: the study's pipeline at the main settings, shrunk to ~20 s, still
    gives the numbers committed beside the results (fdpo_study/fingerprint.py); else the message says what to run."""
    from fdpo_study import fingerprint

    moved = fingerprint.check()
    assert not moved, f"{fingerprint.REGENERATE}. Moved:\n" + "\n".join(moved)


# ---------------------------------------------------------------- where the study lives


def test_the_kernel_package_never_imports_the_study():
    """fdpo_study is not in the wheel: nothing under fdiv_kernels/ may import it (the wheel would break)."""
    root = Path(__file__).resolve().parents[1]
    importers = [
        str(path.relative_to(root))
        for path in (root / "fdiv_kernels").rglob("*.py")
        if any(line.lstrip().startswith(("import fdpo_study", "from fdpo_study")) for line in path.open())
    ]
    assert importers == []


def test_fdpo_train_names_where_the_study_commands_went(capsys):
    from fdiv_kernels.train.cli import STUDY_COMMANDS
    from fdiv_kernels.train.cli import main as train_main

    for command in STUDY_COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            train_main([command, "--quick"])
        assert exit_info.value.code == 2
        assert f"python -m fdpo_study {command}" in capsys.readouterr().err
        # ... and the study's CLI has each of them.
        with pytest.raises(SystemExit) as exit_info:
            cli_main([command, "--help"])
        usage = capsys.readouterr().out
        assert exit_info.value.code == 0 and usage.startswith(f"usage: python -m fdpo_study {command}")
