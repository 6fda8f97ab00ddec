"""A cheap fingerprint of the study's numbers, committed beside its results, so that they cannot go stale silently.

``results/study/study.json`` takes 5-15 minutes to remake; nothing would notice when a change to the loss, the
loop, the sampler or the reward moves what ``make study`` produces. The fingerprint is the same pipeline
(:func:`fdpo_study.study.run_study`: pairs from the shipped base labelled by the task reward, reference errors,
fine-tunes of three divergences, evaluation) at the main study's settings (seed 0, beta 500, gamma 10, lr 4e-5, hard
labels) shrunk to seconds (:data:`SIZES`). ``results/study/fingerprint.json`` records its numbers;
``tests/test_study.py`` recomputes them and fails, naming the command that regenerates the results, when they
move.

    python -m fdpo_study fingerprint           # compare with the committed numbers (exit 1 if they moved)
    python -m fdpo_study fingerprint --write   # record today's numbers (after regenerating the results)
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

FINGERPRINT = Path(__file__).resolve().parents[1] / "results" / "study" / "fingerprint.json"
# The main study's settings at a size that runs in seconds at one thread.
SIZES = {"pairs": 32, "steps": 4, "batch_size": 16, "eval_prompts": 3, "eval_samples": 3}
# Reverse KL (the baseline), forward KL (the exponential family: alpha and Hellinger share its kernels) and JS.
RUNS = (("reverse_kl", None), ("forward_kl", None), ("js", None))
METRICS = ("reward", "fidelity", "style", "pairwise_distance", "vendi")
TRAIN = ("loss", "implicit_acc", "reward_margin")
# Float rounding across machine types (other SIMD widths) moves the last digits, not the fifth.
RTOL, ATOL = 1e-5, 1e-7
REGENERATE = (
    "the code now gives other numbers for the committed study configuration, so results/study/ is stale: "
    "regenerate it with `make study` (python -m fdpo_study study --output fdpo-study; about 5-15 min), copy "
    "fdpo-study/study.json, study.png and samples.png to results/study/, run `python -m fdpo_study study-report`, "
    "then record the new fingerprint with `python -m fdpo_study fingerprint --write` (seed1, beta5000_gamma1, the "
    "labeller runs and the frontiers have their own commands in docs/training.md)"
)


def compute() -> dict:
    """Run the shrunk study in a temporary folder; the numbers per model."""
    import torch

    from .study import StudyConfig, run_study

    # One thread, as the fingerprint was recorded: at two, the convolutions' reductions sum in another order and
    # sampling carries that into the evaluation (the base's reward moved by 1.2e-4 relative), past RTOL.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = run_study(StudyConfig(output=Path(tmp) / "study", progress=False, **SIZES), runs=RUNS)
    finally:
        torch.set_num_threads(threads)
    models = {}
    for row in results["rows"]:
        models[row["model"]] = {k: row[k]["mean"] for k in METRICS}
        models[row["model"]].update({f"final_{k}": row["final_train"][k] for k in TRAIN if "final_train" in row})
    return {
        "sizes": SIZES,
        "runs": [list(r) for r in RUNS],
        "command": "python -m fdpo_study fingerprint --write",
        "models": models,
    }


def differences(recorded: dict, current: dict) -> list[str]:
    """Each number of ``current`` that differs from ``recorded`` beyond rounding, as "model key: old -> new"."""
    for key in ("sizes", "runs"):
        if recorded.get(key) != current[key]:
            return [f"{key} {recorded.get(key)} -> {current[key]}"]
    out = []
    for model, values in current["models"].items():
        old = recorded["models"].get(model, {})
        for key, value in values.items():
            if key not in old or not math.isclose(old[key], value, rel_tol=RTOL, abs_tol=ATOL):
                out.append(f"{model} {key}: {old.get(key)} -> {value}")
    out += [f"{model}: no longer computed" for model in recorded["models"] if model not in current["models"]]
    return out


def check(path: Path = FINGERPRINT) -> list[str]:
    """The differences between the committed fingerprint and today's code (empty: up to date)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `python -m fdpo_study fingerprint --write`")
    return differences(json.loads(path.read_text()), compute())


def write(path: Path = FINGERPRINT) -> dict:
    current = compute()
    path.write_text(json.dumps(current, indent=1) + "\n")
    return current
