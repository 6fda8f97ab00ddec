"""What the training tests share: tiny pipelines and preference datasets laid out the way diffusers and Pick-a-Pic
lay them out (no downloads), the config and flags of a short CPU run, the CLI runners, and the comparison of two
runs' logs. The ``assets`` fixture that builds them once per test module lives in conftest.py."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from PIL import Image
from safetensors.torch import load_file

from fdiv_kernels.train.cli import main
from fdiv_kernels.train.loop import TrainConfig
from fdiv_kernels.train.model import TinyTextEncoder, WordTokenizer, tiny_unet

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["a", "red", "blue", "cat", "dog", "on", "grass"]
CAPTIONS = ["a red cat", "a blue dog", "a cat on grass", "a red dog on grass"]
LOGGED = ("loss", "implicit_acc", "raw_model_loss", "raw_ref_loss", "reward_margin")

# accelerate's own --cpu launcher starts several processes only through mpirun; its torchrun-based launcher
# (--multi_gpu) with the trainer's --cpu runs CPU processes over gloo.
TWO_CPU_PROCESSES = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--num_processes",
    "2",
]


def tiny_vae(**overrides) -> AutoencoderKL:
    """The tests' tiny VAE: 16 px RGB images -> 4x8x8 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
        **overrides,
    )


def make_pipeline(
    folder: Path, *, vae: bool = True, scheduler: str = "ddpm", prediction_type: str = "epsilon", unet: bool = True
) -> Path:
    """A diffusers pipeline folder: tiny UNet, optional tiny VAE (16 px -> 4x8x8 latents), embedded text encoder."""
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    index = {
        "_class_name": "TinyTestPipeline",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["fdiv_kernels.train", "TinyTextEncoder"],
        "tokenizer": ["fdiv_kernels.train", "WordTokenizer"],
    }
    if unet:
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
        tiny_unet(
            8 if vae else 16, channels=4 if vae else 3, cross_attention_dim=16, block_out_channels=(8, 16)
        ).save_pretrained(folder / "unet")
    if vae:
        index["vae"] = ["diffusers", "AutoencoderKL"]
        tiny_vae().save_pretrained(folder / "vae")
    if scheduler == "flow":
        index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    else:
        DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type).save_pretrained(folder / "scheduler")
    WordTokenizer(WORDS, 6).save_pretrained(folder / "tokenizer")
    TinyTextEncoder(len(WORDS), 6, width=16, layers=1, heads=2).save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _jpeg(seed: int, size=(20, 24)) -> bytes:
    array = torch.randint(
        0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )
    buffer = io.BytesIO()
    Image.fromarray(array.numpy()).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_dataset(folder: Path, pairs: int = 12, fmt: str = "jsonl", labels=None) -> Path:
    """A Pick-a-Pic table: jsonl with image paths (folder of JPEGs) or parquet with image bytes."""
    folder.mkdir(parents=True)
    labels = labels or [float(i % 2) for i in range(pairs)]
    rows = []
    for i, label in enumerate(labels):
        row = {"caption": CAPTIONS[i % len(CAPTIONS)], "label_0": label}
        for side in (0, 1):
            data = _jpeg(2 * i + side)
            if fmt == "jsonl":
                (folder / "images").mkdir(exist_ok=True)
                (folder / "images" / f"{i}_{side}.jpg").write_bytes(data)
                row[f"jpg_{side}"] = f"images/{i}_{side}.jpg"
            else:
                row[f"jpg_{side}"] = data
        rows.append(row)
    if fmt == "jsonl":
        (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), folder / "pairs.parquet")
    return folder


def config(assets, output: Path, **overrides) -> TrainConfig:
    args = dict(
        pipeline=assets["pipeline"],
        dataset=assets["dataset"],
        output=output,
        max_steps=3,
        batch_size=4,
        learning_rate=1e-3,
        log_every=1,
        cpu=True,
        progress=False,
    )
    return TrainConfig(**{**args, **overrides})


def unet_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def train_argv(assets, out: Path | None, *extra: str) -> list[str]:
    """``train`` flags for a 2-step CPU run on the module's assets (``--output out`` unless None); ``extra`` flags
    come last, and win."""
    output = [] if out is None else ["--output", str(out)]
    return [
        "train",
        "--pipeline",
        str(assets["pipeline"]),
        "--dataset",
        str(assets["dataset"]),
        *output,
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--cpu",
        "--no-progress",
        *extra,
    ]


def cli_error(argv: list[str], capsys, cli=main) -> str:
    """Run the CLI (``fdpo-train``'s, or ``cli`` = the study's), expect exit status 2 and one line on stderr; return
    that line."""
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def run_cli(
    args: list[str], cwd: Path, launcher: list[str], module: str = "fdiv_kernels.train", **env: str
) -> subprocess.CompletedProcess:
    """``launcher -m module args`` in a subprocess (one thread per process: the runner has 2 cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **env}
    return subprocess.run(
        [*launcher, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


# ---------------------------------------------------------------------------------------------------------------
# Comparing runs: what each logged number is computed from, and how far summation order may move it.
#
# Runs that differ in summation order (one process vs two, readers, frozen vs cached reference) compute the
# per-sample errors e, e_ref and their gap g = e_ref - e up to float rounding. The loss head does not see g: it sees
# d = beta/2 * w * g, and the logit z = gamma * (psi(d_w) - psi(d_l)). At the trainers' beta 5000 that multiplies a
# rounding difference in g by 2500. So runs are compared in two tiers: the unamplified per-sample quantities
# (e, e_ref, g) tightly, and what is computed from d (loss, reward margin, implicit accuracy) within the bound that
# beta/2 * w * |measured difference in g| gives, recorded per micro-step (:func:`record_steps`).

RECORD_ENV = "FDPO_TEST_RECORD_STEPS"  # a subprocess run records its steps to this path prefix
# Relative agreement of the unamplified per-sample errors of two runs of the same training: fp32 rounding (6e-8)
# carried through the UNet's forward, its backward, the all-reduce and AdamW's steps (whose first steps are
# g / (|g| + eps), insensitive to relative changes in g), with room. Measured: <= 1e-6 (raw_model_loss to 2e-7).
ERRORS_RTOL = 1e-5
# A few fp32 roundings of a logged mean (the head's, the mean over pairs, the all-reduce), relative to max(1, |x|).
LOG_SLACK = 16 * 2.0**-24


def record_steps(prefix: Path, patch=setattr) -> None:
    """Make the training loop append, per micro-step, what its logged numbers are computed from to
    ``prefix.RANK.jsonl``: the pair positions, the loss settings, the per-sample statistics, and a digest of the
    gradients after backward (this process's shards of them under --fsdp). ``patch``: ``monkeypatch.setattr`` in
    a test's own process."""
    import hashlib

    from accelerate import Accelerator

    from fdiv_kernels.train import loop

    rank = os.environ.get("RANK", "0")
    pending: dict = {}
    sharded: list = []  # --fsdp's model, which Accelerate does not hold
    noised_batch, fused_fdpo_loss, backward = loop.noised_batch, loop.fused_fdpo_loss, Accelerator.backward
    shard_model = loop.shard_model

    def shard(model, *args, **kwargs):
        sharded.append(model)
        return shard_model(model, *args, **kwargs)

    def noised(setup, batch, *args, **kwargs):
        pending["positions"] = batch["position"].tolist()
        return noised_batch(setup, batch, *args, **kwargs)

    def loss_fn(*args, **kwargs):
        out = fused_fdpo_loss(*args, **kwargs)
        if kwargs.get("return_stats"):  # the step's call (the flag checks call it too)
            weight = kwargs.get("pair_weight")
            pending.update(
                {k: kwargs.get(k) for k in ("beta", "gamma", "divergence", "label_smoothing")},
                pair_weight=None if weight is None else weight.tolist(),
                loss=out[0].item(),
                **{k: getattr(out[1], k).tolist() for k in ("logits", "model_err", "ref_err", "logratio", "reward")},
            )
        return out

    def backward_and_record(self, loss, **kwargs):
        backward(self, loss, **kwargs)
        grads = [p.grad for model in [*self._models, *sharded] for p in model.parameters() if p.grad is not None]
        local = [getattr(g, "to_local", lambda g=g: g)().detach().float().cpu().contiguous() for g in grads]
        digest = hashlib.sha256(b"".join(g.numpy().tobytes() for g in local)).hexdigest()
        with open(f"{prefix}.{rank}.jsonl", "a") as file:
            file.write(json.dumps({**pending, "rank": int(rank), "grad_sha256": digest}) + "\n")
        pending.clear()

    patch(loop, "noised_batch", noised)
    patch(loop, "fused_fdpo_loss", loss_fn)
    patch(Accelerator, "backward", backward_and_record)
    patch(loop, "shard_model", shard)


def read_steps(prefix: Path) -> list[dict]:
    """The micro-steps :func:`record_steps` recorded, each over the global batch, pairs in stream order (float64):
    ``z`` [B]; ``e``, ``e_ref``, ``d``, ``reward``, ``g`` = d / (beta/2 w) as (winners [B], losers [B]); ``scale``
    beta/2 w [B]; ``grad_sha256`` per process; and the loss settings."""
    files = sorted(prefix.parent.glob(f"{prefix.name}.*.jsonl"), key=lambda f: int(f.name.split(".")[-2]))
    ranks = [[json.loads(line) for line in f.read_text().splitlines()] for f in files]
    assert ranks and len({len(r) for r in ranks}) == 1, f"{prefix}: uneven records {[len(r) for r in ranks]}"
    steps = []
    for parts in zip(*ranks):
        b = [len(p["logits"]) for p in parts]

        def pairs(key, parts=parts, b=b):  # (winners, losers) of the global batch, in rank order
            rows = [torch.tensor(p[key], dtype=torch.float64) for p in parts]
            return torch.cat([r[:n] for r, n in zip(rows, b)]), torch.cat([r[n:] for r, n in zip(rows, b)])

        positions = torch.tensor(sum((p["positions"] for p in parts), []))
        order = positions.argsort()
        first = parts[0]
        weight = 1.0 if first["pair_weight"] is None else torch.tensor(sum((p["pair_weight"] for p in parts), []))
        scale = (0.5 * first["beta"] * torch.ones(len(positions), dtype=torch.float64) * weight)[order]
        step = {k: first[k] for k in ("beta", "gamma", "divergence", "label_smoothing")}
        step.update(
            positions=positions[order],
            z=torch.cat([torch.tensor(p["logits"], dtype=torch.float64) for p in parts])[order],
            scale=scale,
            grad_sha256=[p["grad_sha256"] for p in parts],
            **{
                name: tuple(x[order] for x in pairs(key))
                for name, key in (("e", "model_err"), ("e_ref", "ref_err"), ("d", "logratio"), ("reward", "reward"))
            },
        )
        step["g"] = tuple(d / scale for d in step["d"])
        steps.append(step)
    return steps


def logged_from_stats(step: dict) -> dict[str, float]:
    """What the loop logs for one micro-step, recomputed in float64 from the statistics it is computed from."""
    z, eps = step["z"], step["label_smoothing"] or 0.0
    losses = -(1 - eps) * torch.nn.functional.logsigmoid(z) - eps * torch.nn.functional.logsigmoid(-z)
    return {
        "loss": losses.mean().item(),
        "implicit_acc": ((z > 0).double() + 0.5 * (z == 0).double()).mean().item(),
        "raw_model_loss": torch.cat(step["e"]).mean().item(),
        "raw_ref_loss": torch.cat(step["e_ref"]).mean().item(),
        "reward_margin": (step["reward"][0] - step["reward"][1]).mean().item(),
    }


def _per_record(run: Path, steps: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Each log record with the micro-steps it averages (those since the previous record)."""
    accumulation = json.loads((run / "train_config.json").read_text())["gradient_accumulation_steps"]
    records, previous, out = read_log(run), 0, []
    for record in records:
        out.append((record, steps[previous * accumulation : record["step"] * accumulation]))
        previous = record["step"]
    return out


def assert_log_matches_stats(run: Path, steps: list[dict]) -> None:
    """Every logged number is the mean, over the micro-steps since the last record and over the global batch (all
    processes), of what the loss statistics give: the loss of the logits, the fraction of positive logits, the
    mean errors, and the reward margin mean(psi(d_w) - psi(d_l)) (winner minus loser)."""
    for record, micro in _per_record(run, steps):
        assert micro, (run, record)
        expected = {k: sum(logged_from_stats(s)[k] for s in micro) / len(micro) for k in LOGGED}
        for key in LOGGED:
            slack = LOG_SLACK * max(1.0, abs(expected[key]))
            assert abs(record[key] - expected[key]) <= slack, (run.name, record["step"], key, record[key], expected)


def amplification_bound(a: dict, b: dict) -> torch.Tensor:
    """Per pair, how far the logit z = gamma (psi(d_w) - psi(d_l)) of one micro-step may differ between two runs
    whose error gaps g = e_ref - e differ by the measured |dg|: gamma * beta/2 * w * (|dg_w| + |dg_l|) (reverse KL:
    psi(d) = d, so psi' = 1), plus the rounding of each run's d and z (2 ulps each)."""
    assert a["divergence"] == b["divergence"] == "reverse_kl", "the bound is derived for psi(d) = d"
    assert torch.equal(a["positions"], b["positions"]) and torch.equal(a["scale"], b["scale"])
    gap = sum((a["g"][i] - b["g"][i]).abs() for i in (0, 1))
    ulps = sum(a["d"][i].abs() + b["d"][i].abs() for i in (0, 1)) + a["z"].abs() + b["z"].abs()
    return a["gamma"] * a["scale"] * gap + 2 * 2.0**-24 * a["gamma"] * ulps


def assert_runs_match(one: Path, two: Path, steps_one: list[dict], steps_two: list[dict], errors_rtol=ERRORS_RTOL):
    """Two runs of the same training whose summation orders differ (one process and two, say) logged the same
    numbers, as far as float rounding and its amplification allow.

    Each log is first checked against its own run's statistics (:func:`assert_log_matches_stats`). Then, per
    sample, the unamplified errors and gaps agree to ``errors_rtol``, relative to e + e_ref; the logged raw losses
    likewise. The loss (1-Lipschitz in z), the reward margin (psi' = 1) and the implicit accuracy (a pair counts
    differently only if its logit may change sign) agree within what :func:`amplification_bound` derives from the
    measured gap differences: at step 1, where the policy is the reference and every logit is rounding noise
    amplified by beta/2, that is every pair; later, a small multiple of |dg| * beta/2."""
    assert_log_matches_stats(one, steps_one)
    assert_log_matches_stats(two, steps_two)
    logs = _per_record(one, steps_one), _per_record(two, steps_two)
    assert [r["step"] for r, _ in logs[0]] == [r["step"] for r, _ in logs[1]] and len(logs[0]) >= 2
    for (a, micro_a), (b, micro_b) in zip(*logs):
        bounds = {"loss": 0.0, "reward_margin": 0.0, "implicit_acc": 0.0}
        for x, y in zip(micro_a, micro_b, strict=True):
            size = torch.cat(x["e"]) + torch.cat(x["e_ref"])
            for key in ("e", "e_ref", "g"):
                diff = (torch.cat(x[key]) - torch.cat(y[key])).abs()
                assert (diff <= errors_rtol * size).all(), (a["step"], key, (diff / size).max().item())
            dz = amplification_bound(x, y)
            slack = LOG_SLACK * max(1.0, abs(logged_from_stats(x)["loss"]))
            bounds["loss"] += (dz.mean().item() + 2 * slack) / len(micro_a)
            bounds["reward_margin"] += (dz.mean().item() / x["gamma"] + 2 * slack) / len(micro_a)
            may_flip = (x["z"].abs() <= dz).double().mean().item()
            bounds["implicit_acc"] += may_flip / len(micro_a)
        for key in ("raw_model_loss", "raw_ref_loss"):
            assert b[key] == pytest.approx(a[key], rel=errors_rtol), (a["step"], key)
        for key, bound in bounds.items():
            assert abs(b[key] - a[key]) <= bound, (a["step"], key, a[key], b[key], bound)


def assert_starts_at_reference(run: Path, steps: list[dict]) -> None:
    """At step 1 the policy is the reference: per sample, the gap g = e_ref - e is float rounding (ERRORS_RTOL of
    e + e_ref; the two may run other kernels, with and without autograd), and the logged loss is log 2 within
    what beta/2 makes of it: -log sigmoid(z) = log 2 - z/2 + log cosh(z/2) (label smoothing scales the z/2), so
    |loss - log 2| <= mean(|z|/2 + z^2/8) with |z| <= gamma * beta/2 * w * (|g_w| + |g_l|)."""
    assert_log_matches_stats(run, steps)
    (record, micro), *_ = _per_record(run, steps)
    assert record["step"] == 1 and len(micro) == 1
    first = micro[0]
    g, size = torch.cat(first["g"]).abs(), torch.cat(first["e"]) + torch.cat(first["e_ref"])
    assert (g <= ERRORS_RTOL * size).all(), (g / size).max().item()
    z = first["gamma"] * first["scale"] * (first["g"][0].abs() + first["g"][1].abs())
    bound = (z / 2 + z**2 / 8).mean().item() + LOG_SLACK
    assert abs(record["loss"] - math.log(2)) <= bound, (record["loss"], bound)


def assert_gradients_synchronised(steps: list[dict]) -> None:
    """Every process held the same gradients after each backward: DDP's reducer averaged them, which it does only
    when the loss is computed on the wrapped model's output."""
    assert all(len(s["grad_sha256"]) > 1 for s in steps)
    assert all(len(set(s["grad_sha256"])) == 1 for s in steps), [s["grad_sha256"] for s in steps]


def trained_errors(pipeline: Path, dataset: Path, run: Path | None = None) -> torch.Tensor:
    """Per-sample errors [8] of a run's trained denoiser (the pipeline's own if ``run`` is None) on the first 4
    pairs of the seed-0 stream: what the trained weights compute, the quantity the runs are compared on."""
    from fdiv_kernels.train import loop
    from fdiv_kernels.train.lora import load_lora
    from fdiv_kernels.train.model import denoiser_name

    cfg = TrainConfig(pipeline=pipeline, dataset=dataset, output=Path("unused"), batch_size=4, cpu=True)
    setup = loop.prepare_run(cfg)
    model = setup.pipe.unet
    name = denoiser_name(model)
    if run is not None and (run / "lora").is_dir():
        model = load_lora(model, run / "lora", name)
    elif run is not None:
        model.load_state_dict(load_file(run / name / "diffusion_pytorch_model.safetensors"))
    stream = loop.PairStream(setup.pairs, 0, 4)
    batch = torch.utils.data.default_collate([stream[i] for i in range(4)])
    noisy, timesteps, target, cond = loop.noised_batch(setup, batch, 0, torch.device("cpu"))
    with torch.no_grad():
        pred = loop.denoise(model.eval(), noisy, timesteps, cond)
    return (pred.double() - target.double()).square().flatten(1).mean(1)


def assert_same_trained_model(pipeline: Path, dataset: Path, one: Path, two: Path) -> None:
    """Two runs saved the same trained model, compared by what it computes (its errors, to ERRORS_RTOL) rather
    than weight by weight: weights whose gradient is mathematically zero (a bias ahead of a GroupNorm) get AdamW
    steps lr * g / (|g| + eps) from rounding noise alone, a gain of lr / eps = 1e5 on it, so they differ by up
    to ~lr between runs (measured: 66 of 65k weights by > 0.1 lr) without changing the function."""
    base, a, b = (trained_errors(pipeline, dataset, run) for run in (None, one, two))
    assert ((a - base).abs() > 100 * ERRORS_RTOL * a).any(), "the runs did not train the model"
    assert ((b - a).abs() <= ERRORS_RTOL * a).all(), ((b - a).abs() / a).max().item()


def run_recorded(args: list[str], cwd: Path, launcher: list[str], prefix: Path, **env: str):
    """:func:`run_cli` with every process recording its steps to ``prefix`` (:func:`record_steps`)."""
    return run_cli(args, cwd, launcher, module="train_helpers", **{RECORD_ENV: str(prefix)}, **env)


def tiny_clip_config(vocab_size: int, width: int = 8):
    """A tiny transformers CLIP text-encoder config (the test pipelines' CLIP text sides; callers import-skip
    transformers). ``projection_dim`` serves CLIPTextModelWithProjection and is ignored by CLIPTextModel."""
    import transformers

    return transformers.CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=24,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


if __name__ == "__main__":  # run_recorded: the CLI, recording each process's steps
    record_steps(Path(os.environ[RECORD_ENV]))
    sys.exit(main(sys.argv[1:]))
