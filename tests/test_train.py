"""The training loop, its data and pipeline readers, and the embedded task, on tiny models built here (no downloads)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from train_helpers import (
    TWO_CPU_PROCESSES,
    assert_gradients_synchronised,
    assert_runs_match,
    assert_same_trained_model,
    cli_error,
    config,
    make_dataset,
    make_pipeline,
    read_log,
    read_steps,
    record_steps,
    run_cli,
    run_recorded,
    tiny_clip_config,
    train_argv,
    unet_weights,
)

from fdiv_kernels.train.cli import main
from fdiv_kernels.train.data import DatasetError, PreferenceDataset
from fdiv_kernels.train.loop import cache_reference_errors, train
from fdiv_kernels.train.model import (
    NoiseProcess,
    PipelineError,
    load_pipeline,
)
from fdpo_study import task
from fdpo_study.cli import main as study_main
from fdpo_study.pretrain import prompts_held_out
from fdpo_study.study import BASE_PIPELINE, NOVEL_BASE

# ---------------------------------------------------------------------------------------------------------------
# The embedded task.


def test_reward_prefers_the_prompt_the_image_was_rendered_from():
    g = torch.Generator().manual_seed(0)
    specs = list(task.ALL_SPECS)
    images = task.render(specs, g)
    right = task.reward(images, specs)
    shuffled = task.reward(images, [specs[i] for i in torch.randperm(len(specs), generator=g)])
    assert right["fidelity"].mean() > 0.7 and shuffled["fidelity"].mean() < 0.4
    # Changing one word of the prompt lowers that attribute's score.
    for attribute, values in (
        ("colour", list(task.COLOURS)),
        ("shape", list(task.SHAPES)),
        ("size", list(task.SIZES)),
        ("position", list(task.POSITIONS)),
    ):

        def other(spec, attribute=attribute, values=values):
            value = values[(values.index(getattr(spec, attribute)) + 1) % len(values)]
            return task.Spec(**{**spec.__dict__, attribute: value})

        changed = task.reward(images, [other(s) for s in specs])
        assert right[attribute].mean() > changed[attribute].mean() + 0.3, attribute


def test_style_prefers_dark_backgrounds():
    spec = [task.ALL_SPECS[0]]
    dark, light = torch.zeros(1, 3, 16, 16), torch.full((1, 3, 16, 16), 0.5)
    assert task.reward(dark, spec)["style"] == 1.0
    assert task.reward(light, spec)["style"] < 0.2


def test_diversity_measures():
    g = torch.Generator().manual_seed(0)
    same = torch.rand(1, 1, 3, 16, 16, generator=g).expand(2, 6, -1, -1, -1)
    assert torch.allclose(task.pairwise_distance(same), torch.zeros(2), atol=1e-3)
    assert torch.allclose(task.vendi_score(same), torch.ones(2), atol=1e-3)
    distinct = torch.rand(2, 6, 3, 16, 16, generator=g)
    assert (task.vendi_score(distinct) > 5.9).all()
    assert (task.pairwise_distance(distinct) > 0.3).all()


def test_split_is_fixed_and_disjoint():
    train_specs, held_out = task.split_specs()
    assert len(train_specs) == 144 and len(held_out) == 36
    assert not set(train_specs) & set(held_out)
    assert task.split_specs() == (train_specs, held_out)
    novel = task.novel_specs()
    assert len(novel) == 18 and set(novel) < set(held_out) and task.novel_specs() == novel


@pytest.mark.parametrize(
    "base, held_out", [(BASE_PIPELINE, set()), (NOVEL_BASE, {s.caption for s in task.novel_specs()})]
)
def test_shipped_base_models_are_small_load_and_record_their_prompts(base, held_out):
    size = sum(f.stat().st_size for f in base.rglob("*") if f.is_file())
    assert size < 4 * 2**20
    pipe = load_pipeline(base)
    assert pipe.vae is None and pipe.resolution == task.RESOLUTION
    assert prompts_held_out(base) == held_out


# ---------------------------------------------------------------------------------------------------------------
# Reading preference data and pipelines; bad input.


def test_jsonl_paths_and_parquet_bytes_read_the_same_pairs(tmp_path):
    labels = [1.0, 0.0, 0.5, 1.0]
    a = PreferenceDataset(make_dataset(tmp_path / "j", fmt="jsonl", labels=labels), 16)
    b = PreferenceDataset(make_dataset(tmp_path / "p", fmt="parquet", labels=labels), 16)
    assert len(a) == len(b) == 3 and a.dropped_ties == 1
    for i in range(3):
        assert a[i]["caption"] == b[i]["caption"]
        assert torch.equal(a[i]["pixels"], b[i]["pixels"])
        assert a[i]["pixels"].shape == (2, 3, 16, 16)
        assert a[i]["pixels"].min() >= -1 and a[i]["pixels"].max() <= 1
    # label_0 = 0 means image 1 won: the winner comes first.
    winner_of_pair_1 = a._pixels(tmp_path / "j" / "images" / "1_1.jpg", "")
    assert torch.equal(a[1]["pixels"][0], winner_of_pair_1)


def _rewrite_jsonl(folder: Path, edit) -> None:
    table = folder / "pairs.jsonl"
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    edit(rows)
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda folder: _rewrite_jsonl(folder, lambda r: [row.pop("label_0") for row in r]),
            r"pairs.jsonl: missing column\(s\) \['label_0'\]",
        ),
        (
            lambda folder: (folder / "images" / "2_1.jpg").write_bytes(b"not an image"),
            r"images/2_1.jpg: not a readable image",
        ),
        (
            lambda folder: (folder / "images" / "3_0.jpg").unlink(),
            r"row 3: column 'jpg_0' names .*images/3_0.jpg, which does not exist",
        ),
        (
            lambda folder: _rewrite_jsonl(folder, lambda r: r[1].update(label_0="yes")),
            r"pairs.jsonl row 1: column 'label_0' must be 1, 0 or 0.5",
        ),
        (
            lambda folder: (folder / "pairs.jsonl").rename(folder / "pairs.csv"),
            r"expected .parquet shards or one .jsonl table, found none",
        ),
    ],
    ids=["missing-column", "unreadable-image", "missing-image", "bad-label", "no-table"],
)
def test_bad_dataset_is_named_and_nothing_is_written(assets, tmp_path, edit, message):
    data = make_dataset(tmp_path / "data")
    edit(data)
    out = tmp_path / "run"
    with pytest.raises(DatasetError, match=message):
        train(config(assets, out, dataset=data))
    assert not out.exists()


def test_parquet_missing_column_names_the_file(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    pq.write_table(pa.table({"caption": ["a cat"], "jpg_0": [b""], "label_0": [1.0]}), folder / "train-0.parquet")
    with pytest.raises(DatasetError, match=r"train-0.parquet: missing column\(s\) \['jpg_1'\]"):
        PreferenceDataset(folder, 16)


def test_bad_pipeline_is_named_and_nothing_is_written(assets, tmp_path):
    no_unet = make_pipeline(tmp_path / "no_unet", unet=False)
    out = tmp_path / "run"
    with pytest.raises(PipelineError, match=r"no_unet/model_index.json lists no 'unet' component"):
        train(config(assets, out, pipeline=no_unet))
    with pytest.raises(PipelineError, match=r"model_index.json not found"):
        train(config(assets, out, pipeline=tmp_path))
    # The VAE halves the image and the UNet halves it once more: sides must be multiples of 4.
    with pytest.raises(PipelineError, match=r"--resolution 18 does not fit .*multiples of 4"):
        train(config(assets, out, resolution=18))
    assert not out.exists()


def test_cli_reports_bad_input_in_one_line(assets, tmp_path, capsys):
    missing = {**assets, "pipeline": tmp_path / "missing"}
    assert "fdpo-train train: error: pipeline folder" in cli_error(train_argv(missing, tmp_path / "run"), capsys)
    line = cli_error(train_argv(assets, tmp_path / "run", "--divergence", "chi2"), capsys)
    assert "divergence='chi2' violates the f-DPO condition" in line


def test_existing_output_is_not_overwritten(assets, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="is not empty and holds no run of this trainer"):
        train(config(assets, out))
    assert (out / "precious.txt").read_text() == "keep"


# ---------------------------------------------------------------------------------------------------------------
# The training loop.


def test_noise_process_targets():
    x, noise, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 50, 99])
    eps = NoiseProcess(DDPMScheduler(num_train_timesteps=100).config)
    assert eps.shared_target and torch.equal(eps.prepare(x, noise, t)[2], noise)
    v = NoiseProcess(DDPMScheduler(num_train_timesteps=100).config, "v_prediction")
    a = v.scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - v.scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert not v.shared_target and torch.allclose(v.prepare(x, noise, t)[2], a * noise - s * x, atol=1e-6)
    # As read from scheduler_config.json, which names the scheduler class.
    flow = NoiseProcess({"_class_name": "FlowMatchEulerDiscreteScheduler", **FlowMatchEulerDiscreteScheduler().config})
    noisy, timesteps, target = flow.prepare(x, noise, t)
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    assert flow.prediction_type == "flow" and torch.equal(target, noise - x)
    assert torch.allclose(noisy, (1 - sigma) * x + sigma * noise, atol=1e-6)


def test_train_logs_checkpoints_and_saves_a_loadable_unet(assets, tmp_path):
    result = train(config(assets, tmp_path / "run", checkpoint_every=2))
    assert [r["step"] for r in result.records] == [1, 2, 3]
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged == result.records
    for key in ("loss", "implicit_acc", "raw_model_loss", "raw_ref_loss", "reward_margin", "lr"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in logged), key
    # The first step starts at the reference: the loss is log 2 up to float noise.
    assert abs(logged[0]["loss"] - 0.6931) < 1e-3
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (tmp_path / "run" / "checkpoint-2" / "model.safetensors").is_file()
    tuned = load_pipeline(assets["pipeline"], unet=tmp_path / "run" / "unet")
    base = load_pipeline(assets["pipeline"])
    assert any(not torch.equal(a, b) for a, b in zip(tuned.unet.parameters(), base.unet.parameters()))


@pytest.mark.parametrize("scheduler, prediction_type", [("ddpm", "v_prediction"), ("flow", None)])
def test_other_targets_train(tmp_path, assets, scheduler, prediction_type):
    pipe = make_pipeline(tmp_path / "pipe", scheduler=scheduler, prediction_type=prediction_type or "epsilon")
    result = train(config(assets, tmp_path / "run", pipeline=pipe, max_steps=2))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.records)


def test_pixel_space_pipeline_with_gradient_accumulation(assets, tmp_path):
    result = train(
        config(
            assets,
            tmp_path / "run",
            pipeline=assets["pixel_pipeline"],
            max_steps=2,
            gradient_accumulation_steps=2,
            log_every=2,
        )
    )
    assert [r["step"] for r in result.records] == [2]


def test_same_seed_same_numbers_and_resume_continues_the_run(assets, tmp_path):
    # A warm-up longer than the checkpoint's step: the resumed run must continue the schedule, not restart it.
    warm = {"lr_warmup_steps": 3}
    full = train(config(assets, tmp_path / "full", max_steps=4, checkpoint_every=2, **warm))
    assert [r["lr"] for r in full.records] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])
    again = train(config(assets, tmp_path / "again", max_steps=4, **warm))
    assert again.records == full.records
    # Interrupt after step 2: keep checkpoint-2 only, then resume.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    for name in ("checkpoint-4", "unet", "log.jsonl"):
        shutil.rmtree(cut / name) if (cut / name).is_dir() else (cut / name).unlink()
    resumed = train(config(assets, cut, max_steps=4, checkpoint_every=2, resume="latest", **warm))
    assert resumed.records == full.records[2:]
    for key, value in unet_weights(tmp_path / "full").items():
        assert torch.equal(value, unet_weights(cut)[key]), key


def test_cached_reference_errors_match_the_frozen_reference(assets, tmp_path, monkeypatch):
    record_steps(tmp_path / "frozen-steps", monkeypatch.setattr)
    train(config(assets, tmp_path / "frozen"))
    cache = cache_reference_errors(config(assets, tmp_path / "unused"), tmp_path / "ref.safetensors")
    record_steps(tmp_path / "cached-steps", monkeypatch.setattr)
    train(config(assets, tmp_path / "cached", ref_errors=cache))
    # The cache holds the reference's errors on exactly the samples, noise and timesteps of each step. With
    # cached errors the gap e_ref - e is a difference of two rounded fp32 errors instead of one accumulation, so
    # at step 1 d = beta/2 (e_ref - e) differs by beta/2 times that rounding (~1e-4), and so does each pair's
    # gradient weight sigma(-z) (relative): AdamW's first step, about lr * sign(g), turns that into +-lr in the
    # weights whose gradient changes sign, and the errors after it agree to ~1e-4 (measured 8e-5), not to the
    # rounding of an all-reduce. What the head computes from them agrees within the bound derived from them.
    frozen, cached = (read_steps(tmp_path / f"{run}-steps") for run in ("frozen", "cached"))
    assert_runs_match(tmp_path / "frozen", tmp_path / "cached", frozen, cached, errors_rtol=1e-3)
    with pytest.raises(ValueError, match="was computed with seed='0'; this run has '1'"):
        train(config(assets, tmp_path / "other", ref_errors=cache, seed=1))
    with pytest.raises(ValueError, match="covers 12 pair draws; this run needs 16"):
        train(config(assets, tmp_path / "longer", ref_errors=cache, max_steps=4))


def test_log_grad_weights_logs_or_says_why_not(assets, tmp_path, capsys):
    result = train(config(assets, tmp_path / "run", max_steps=1, divergence="js", log_grad_weights=True))
    try:
        import fdiv_kernels.gradient_field  # noqa: F401
    except ImportError:
        assert "fdiv_kernels.gradient_field is not available" in capsys.readouterr().out
        assert "push_w" not in result.records[0]
    else:
        assert {"push_w", "push_l"} <= set(result.records[0])


def test_cli_ref_errors_then_train_with_them(assets, tmp_path):
    data = [
        "--pipeline",
        str(assets["pipeline"]),
        "--dataset",
        str(assets["dataset"]),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--cpu",
        "--no-progress",
    ]
    assert main(["ref-errors", *data, "--output", str(tmp_path / "ref.safetensors")]) == 0
    assert (
        main(
            [
                "train",
                *data,
                "--output",
                str(tmp_path / "run"),
                "--ref-errors",
                str(tmp_path / "ref.safetensors"),
                "--divergence",
                "alpha",
                "--alpha",
                "0.3",
                "--log-every",
                "1",
            ]
        )
        == 0
    )
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2]
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["divergence"] == "alpha"


def test_two_processes_match_one_process_with_the_same_global_batch(assets, tmp_path):
    common = train_argv(assets, None, "--max-steps", "3", "--learning-rate", "1e-3")
    two = run_recorded([*common, "--output", str(tmp_path / "two")], tmp_path, TWO_CPU_PROCESSES, tmp_path / "s2")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_recorded([*common, "--output", str(tmp_path / "one")], tmp_path, [sys.executable], tmp_path / "s1")
    assert one.returncode == 0, one.stderr[-3000:]
    run_two = json.loads((tmp_path / "two" / "train_config.json").read_text())
    assert (run_two["num_processes"], run_two["distributed_backend"]) == (2, "gloo")
    steps_two = read_steps(tmp_path / "s2")
    # Each process computed its half of the global batch (the pairs of stream positions 4k..4k+3, split 2 + 2);
    # the log holds the global numbers (all-reduced), within the derived bound of the one-process run's.
    assert [len(set(s["grad_sha256"])) for s in steps_two] == [1] * 3
    assert_runs_match(tmp_path / "one", tmp_path / "two", read_steps(tmp_path / "s1"), steps_two)
    assert_gradients_synchronised(steps_two)
    assert_same_trained_model(assets["pipeline"], assets["dataset"], tmp_path / "one", tmp_path / "two")


def test_bf16_mixed_precision(assets, tmp_path):
    # A subprocess: Accelerate fixes mixed precision once per process.
    run = run_cli(train_argv(assets, tmp_path / "run", "--mixed-precision", "bf16"), tmp_path, [sys.executable])
    assert run.returncode == 0, run.stderr[-3000:]
    logged = read_log(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)


# ---------------------------------------------------------------------------------------------------------------
# The embedded default: pretrain, make-pairs and the study, end to end.


def test_pretrain_writes_a_loadable_pipeline(tmp_path):
    assert study_main(["pretrain", "--output", str(tmp_path / "base"), "--steps", "2", "--batch-size", "4"]) == 0
    pipe = load_pipeline(tmp_path / "base")
    assert pipe.text.token_ids([task.ALL_SPECS[0].caption]).shape == (1, 7)
    assert prompts_held_out(tmp_path / "base") == set()
    with pytest.raises(SystemExit):
        study_main(["pretrain", "--output", str(tmp_path / "base"), "--steps", "2"])


def test_pretrain_can_hold_out_the_novel_prompts(tmp_path, monkeypatch):
    drawn = []
    render = task.render
    monkeypatch.setattr(task, "render", lambda specs, *a, **k: drawn.extend(specs) or render(specs, *a, **k))
    argv = ["pretrain", "--output", str(tmp_path / "base"), "--steps", "3", "--hold-out-novel"]
    assert study_main(argv) == 0
    novel = set(task.novel_specs())
    # 192 draws from 162 prompts; were the 18 novel ones drawn at their share, none missing has odds ~1e-9.
    assert len(drawn) == 3 * 64 and not novel & set(drawn)
    assert prompts_held_out(tmp_path / "base") == {s.caption for s in novel}
    record = json.loads((tmp_path / "base" / "pretraining.json").read_text())
    assert record["settings"]["hold_out_novel"] is True and record["settings"]["steps"] == 3
    (tmp_path / "base" / "pretraining.json").write_text("{not json")
    with pytest.raises(ValueError, match="pretraining.json"):
        prompts_held_out(tmp_path / "base")
    assert prompts_held_out(tmp_path) is None  # a pipeline not made by pretrain: what it saw is unknown


def test_quick_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    run = run_cli(["study", "--quick", "--output", str(out), "--no-progress"], tmp_path, [sys.executable], "fdpo_study")
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "study.json").read_text())
    models = [row["model"] for row in results["rows"]]
    assert models == ["base", "reverse_kl", "forward_kl", "js", "alpha_0.3", "alpha_0.5", "alpha_0.7", "hellinger"]
    table = (out / "study.md").read_text()
    assert table.splitlines()[2].startswith("| base |") and table in run.stdout
    assert (out / "study.png").stat().st_size > 10_000
    assert results["prompt_groups"] == {}  # the default base saw every prompt in pretraining
    assert results["labels"]["agreement_with_reward"] == 1.0 and "agree with the task reward's ordering" in table
    # The study's preference data is in the Pick-a-Pic schema the real path reads.
    assert len(PreferenceDataset(out / "pairs", task.RESOLUTION)) > 0


def test_transformers_clip_text_encoder_pipeline(tmp_path, assets):
    """A Stable-Diffusion-layout pipeline whose text side is transformers' CLIPTokenizer + CLIPTextModel."""
    transformers = pytest.importorskip("transformers")
    folder = make_pipeline(tmp_path / "sd", unet=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {
        "<|startoftext|>": 0,
        "<|endoftext|>": 1,
        **{c: 2 + i for i, c in enumerate(letters)},
        **{c + "</w>": 28 + i for i, c in enumerate(letters)},
    }
    tokenizer_dir = folder / "tokenizer"
    shutil.rmtree(tokenizer_dir)
    tokenizer_dir.mkdir()
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per character
    (tokenizer_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 24,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )
    shutil.rmtree(folder / "text_encoder")
    transformers.CLIPTextModel(tiny_clip_config(len(vocab), width=16)).save_pretrained(folder / "text_encoder")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"])
    (folder / "model_index.json").write_text(json.dumps(index))
    result = train(config(assets, tmp_path / "run", pipeline=folder, max_steps=2))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.records)
