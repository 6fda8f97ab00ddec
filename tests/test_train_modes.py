"""Training modes beyond full fine-tuning of an SD1.x UNet: LoRA, config files and trackers, flow transformers,
memory/speed switches. Tiny models built here (no downloads), 1-3 steps each."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import ModelMixin
from safetensors import safe_open
from safetensors.torch import load_file
from train_helpers import (
    TWO_CPU_PROCESSES,
    assert_gradients_synchronised,
    assert_runs_match,
    assert_same_trained_model,
    assert_starts_at_reference,
    cli_error,
    config,
    read_log,
    read_steps,
    record_steps,
    run_recorded,
    tiny_clip_config,
    tiny_vae,
    train_argv,
)

from fdiv_kernels.train import loop
from fdiv_kernels.train.cli import main
from fdiv_kernels.train.loop import TrainConfig, train
from fdiv_kernels.train.model import load_pipeline

peft = pytest.importorskip("peft")


# ---------------------------------------------------------------------------------------------------------------
# LoRA


def test_lora_reference_is_the_base_model_with_adapters_off(assets, tmp_path, monkeypatch):
    full = train(config(assets, tmp_path / "full", max_steps=2))

    deepcopy = loop.copy.deepcopy

    def no_model_copy(obj, *args):
        assert not isinstance(obj, ModelMixin), "LoRA must not copy the denoiser for the reference"
        return deepcopy(obj, *args)

    monkeypatch.setattr(loop.copy, "deepcopy", no_model_copy)
    record_steps(tmp_path / "steps", monkeypatch.setattr)
    lora = train(config(assets, tmp_path / "lora", max_steps=2, lora_rank=4, learning_rate=1e-2))
    # The reference is the untouched base: the same reference errors as the full fine-tune's frozen copy, on
    # the same samples, noise and timesteps, at every step (also after the adapters have moved).
    for a, b in zip(full.records, lora.records):
        assert b["raw_ref_loss"] == pytest.approx(a["raw_ref_loss"], rel=1e-6)
    # peft starts B at zero: step 1 is at the reference (loss log 2); then the adapters, and only they, moved it.
    assert_starts_at_reference(tmp_path / "lora", read_steps(tmp_path / "steps"))
    assert lora.records[0]["raw_model_loss"] == pytest.approx(lora.records[0]["raw_ref_loss"], rel=1e-6)
    assert lora.records[1]["raw_model_loss"] != pytest.approx(lora.records[1]["raw_ref_loss"], rel=1e-6)
    assert not (tmp_path / "lora" / "unet").exists()


def test_lora_resumes_bit_for_bit_and_takes_cached_reference_errors(assets, tmp_path):
    full = train(config(assets, tmp_path / "full", max_steps=4, checkpoint_every=2, lora_rank=2, learning_rate=1e-2))
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    for name in ("checkpoint-4", "lora", "log.jsonl"):
        shutil.rmtree(cut / name) if (cut / name).is_dir() else (cut / name).unlink()
    resumed = train(
        config(assets, cut, max_steps=4, checkpoint_every=2, lora_rank=2, learning_rate=1e-2, resume="latest")
    )
    assert resumed.records == full.records[2:]
    weights = [load_file(run / "lora" / "pytorch_lora_weights.safetensors") for run in (tmp_path / "full", cut)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # Cached reference errors stand in for the adapters-off pass: the same reference numbers.
    cache = loop.cache_reference_errors(config(assets, tmp_path / "unused", max_steps=2), tmp_path / "ref.safetensors")
    cached = train(config(assets, tmp_path / "cached", max_steps=2, lora_rank=2, learning_rate=1e-2, ref_errors=cache))
    for a, b in zip(full.records, cached.records):
        assert b["raw_ref_loss"] == pytest.approx(a["raw_ref_loss"], rel=1e-5)


def test_lora_saves_in_diffusers_format_and_loads_back(assets, tmp_path):
    from fdiv_kernels.train.lora import WEIGHT_NAME, load_lora

    train(config(assets, tmp_path / "run", max_steps=1, lora_rank=2, lora_alpha=4.0, learning_rate=1e-2))
    file = tmp_path / "run" / "lora" / WEIGHT_NAME
    saved = load_file(file)
    base = load_pipeline(assets["pipeline"]).unet
    attention = [n for n, _ in base.named_modules() if n.endswith(("attn1.to_q", "attn2.to_q"))]
    # Four projections per attention layer, A and B each, under the pipeline-level "unet." prefix.
    assert len(saved) == 4 * 2 * len(attention) and all(k.startswith("unet.") for k in saved)
    a = saved[f"unet.{attention[0]}.lora.down.weight"]  # diffusers naming of peft's lora_A
    assert a.shape[0] == 2 and a.dtype == torch.float32
    with safe_open(file, "pt") as handle:
        assert "lora_adapter_metadata" in json.dumps(handle.metadata())
    # Loaded into the base UNet: the adapter is active, with the saved weights and alpha (scale alpha/rank = 2).
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 6, 16)
    before = base(x, t, cond).sample
    load_lora(base, tmp_path / "run" / "lora", "unet")
    layer = dict(base.named_modules())[attention[0]]
    assert torch.equal(layer.lora_A["default_0"].weight, a) and layer.scaling["default_0"] == 2.0
    assert not torch.allclose(base(x, t, cond).sample, before)
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors not found"):
        load_lora(base, tmp_path, "unet")


def test_lora_bad_flags_fail_before_anything_is_written(assets, tmp_path, capsys):
    out = tmp_path / "run"
    for rank in (0, -2):
        with pytest.raises(ValueError, match=f"--lora-rank must be a positive integer; got {rank}"):
            config(assets, out, lora_rank=rank)
    with pytest.raises(ValueError, match="--lora-alpha needs --lora-rank"):
        config(assets, out, lora_alpha=8.0)
    with pytest.raises(ValueError, match="--lora-alpha must be > 0"):
        config(assets, out, lora_rank=4, lora_alpha=0.0)
    line = cli_error(train_argv(assets, out, "--lora-rank", "0"), capsys)
    assert "fdpo-train train: error: --lora-rank must be a positive integer; got 0" in line
    assert not out.exists()


def test_lora_on_a_model_without_attention_names_the_pipeline(tmp_path):
    from fdiv_kernels.train.lora import add_lora

    with pytest.raises(ValueError, match=r"--lora-rank: pipe's denoiser has no attention projections"):
        add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), 4, where="pipe's denoiser")


# ---------------------------------------------------------------------------------------------------------------
# Config files and trackers


def _cli_data(assets) -> list[str]:
    return [
        "--pipeline",
        str(assets["pipeline"]),
        "--dataset",
        str(assets["dataset"]),
        "--batch-size",
        "4",
        "--cpu",
        "--no-progress",
        "--log-every",
        "1",
    ]


def test_a_runs_train_config_json_repeats_the_run(assets, tmp_path):
    first = tmp_path / "first"
    assert (
        main(
            [
                "train",
                *_cli_data(assets),
                "--output",
                str(first),
                "--max-steps",
                "2",
                "--divergence",
                "js",
                "--beta",
                "800",
                "--learning-rate",
                "1e-3",
                "--lora-rank",
                "2",
            ]
        )
        == 0
    )
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "train_config.json"), "--output", str(again)]) == 0
    a, b = (json.loads((run / "train_config.json").read_text()) for run in (first, again))
    assert b == {**a, "output": str(again)}
    assert read_log(again) == read_log(first)


def test_command_line_flags_override_the_config_file(assets, tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text(
        f"pipeline: {assets['pipeline']}\ndataset: {assets['dataset']}\nmax-steps: 3\nbatch_size: 4\n"
        "divergence: alpha\nalpha: 0.3\ncpu: true\nprogress: false\nlearning_rate: 0.001\n"
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(file), "--output", str(run), "--max-steps", "1", "--alpha", "0.7"]) == 0
    written = json.loads((run / "train_config.json").read_text())
    assert [written[k] for k in ("max_steps", "alpha", "divergence", "batch_size")] == [1, 0.7, "alpha", 4]
    assert [r["step"] for r in read_log(run)] == [1]


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_stepz: 3\n", r"unknown setting 'max_stepz' \(did you mean 'max_steps'\?\)"),
        ("max_steps: ten\n", r"max_steps \(flag --max-steps\) must be int; got 'ten'"),
        (
            "mixed_precision: fp8\n",
            r"mixed_precision \(flag --mixed-precision\) must be one of \['no', 'fp16', 'bf16'\]",
        ),
        ("cpu: 1\n", r"cpu \(flag --cpu\) must be true or false; got 1"),
        ("- a list\n", r"expected a mapping of flag names to values, got list"),
        ("a: [unclosed\n", r"is not valid YAML \(line 2, column 1: expected ',' or ']', but got '<stream end>'\)"),
    ],
)
def test_bad_config_files_are_named_in_one_line(assets, tmp_path, capsys, text, message):
    file = tmp_path / "bad.yaml"
    file.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(file), *_cli_data(assets), "--output", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fdpo-train train: error: --config {file}") and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_tensorboard_tracker_logs_what_log_jsonl_logs(assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(config(assets, tmp_path / "run", max_steps=2, report_to="tensorboard"))
    events = EventAccumulator(str(tmp_path / "run" / "fdpo")).Reload()
    for key in ("loss", "implicit_acc", "raw_ref_loss"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in result.records], key


def test_report_to_needs_a_known_installed_tracker(assets, tmp_path):
    with pytest.raises(ValueError, match=r"--report-to 'mlflow2': expected one of \['none', 'tensorboard', 'wandb'\]"):
        config(assets, tmp_path / "run", report_to="mlflow2")
    from accelerate.utils import is_wandb_available

    if not is_wandb_available():
        with pytest.raises(ImportError, match=r"--report-to wandb needs the wandb package"):
            config(assets, tmp_path / "run", report_to="wandb")


# ---------------------------------------------------------------------------------------------------------------
# Flow-matching transformers (SD3 layout)


def _char_clip_tokenizer(folder: Path, max_length: int = 24):
    """A CLIPTokenizer with one token per letter (no merges), written to ``folder``: no download."""
    transformers = pytest.importorskip("transformers")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {
        "<|startoftext|>": 0,
        "<|endoftext|>": 1,
        **{c: 2 + i for i, c in enumerate(letters)},
        **{c + "</w>": 28 + i for i, c in enumerate(letters)},
    }
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length, pad_token="<|endoftext|>"
    )
    return tokenizer, len(vocab)


def make_sd3_pipeline(folder: Path) -> Path:
    """A tiny StableDiffusion3Pipeline folder: 1-layer SD3 transformer, tiny VAE (16 px -> 4x8x8), two tiny CLIP text
    encoders with projection, no T5 (as diffusers allows)."""
    transformers = pytest.importorskip("transformers")
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    parts = {}
    for suffix in ("", "_2"):
        tokenizer, vocab_size = _char_clip_tokenizer(folder.parent / f"{folder.name}-tok{suffix}")
        text_config = tiny_clip_config(vocab_size)
        parts[f"text_encoder{suffix}"] = transformers.CLIPTextModelWithProjection(text_config)
        parts[f"tokenizer{suffix}"] = tokenizer
    StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            caption_projection_dim=16,
            pooled_projection_dim=16,
            pos_embed_max_size=8,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.1, scaling_factor=1.5),
        text_encoder_3=None,
        tokenizer_3=None,
        **parts,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd3(assets):
    return make_sd3_pipeline(assets["root"] / "sd3")


def test_sd3_pipeline_conditioning_is_diffusers_own(sd3):
    from diffusers import StableDiffusion3Pipeline

    pipe = load_pipeline(sd3)
    assert type(pipe.unet).__name__ == "SD3Transformer2DModel" and pipe.size_multiple == 2 * 2
    cond = pipe.text(["a red cat", "a dog"], torch.device("cpu"))
    # The same states and pooled projections diffusers' SD3 pipeline computes: CLIP (8 + 8, padded to the 16 of
    # joint_attention_dim; 24 tokens) then the 77 zero rows that stand in for the absent T5.
    absent = dict.fromkeys(["text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"])
    states, _, pooled, _ = StableDiffusion3Pipeline.from_pretrained(sd3, **absent).encode_prompt(
        ["a red cat", "a dog"], None, None, do_classifier_free_guidance=False, max_sequence_length=77
    )
    assert cond["encoder_hidden_states"].shape == (2, 24 + 77, 16) and cond["pooled_projections"].shape == (2, 16)
    assert torch.equal(cond["encoder_hidden_states"], states) and torch.equal(cond["pooled_projections"], pooled)


def test_sd3_trains_on_the_flow_target_and_saves_the_transformer(assets, sd3, tmp_path, monkeypatch):
    record_steps(tmp_path / "steps", monkeypatch.setattr)
    result = train(config(assets, tmp_path / "run", pipeline=sd3, max_steps=2, weighting_scheme="logit_normal"))
    assert_starts_at_reference(tmp_path / "run", read_steps(tmp_path / "steps"))
    assert result.records[1]["loss"] != pytest.approx(0.693147, abs=1e-5)
    tuned = load_pipeline(sd3, unet=tmp_path / "run" / "transformer")
    base = load_pipeline(sd3)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.unet.parameters(), base.unet.parameters()))
    # One step's reference error, by hand: the flow target noise - latents at the drawn timestep.
    setup = loop.prepare_run(config(assets, tmp_path / "x", pipeline=sd3, weighting_scheme="logit_normal"))
    stream = loop.PairStream(setup.pairs, 0, 4)
    batch = torch.utils.data.default_collate([stream[i] for i in range(4)])
    noisy, timesteps, target, cond = loop.noised_batch(setup, batch, 0, torch.device("cpu"))
    g = torch.Generator().manual_seed(loop.derived_seed(0, "noise", 0))
    u = torch.sigmoid(torch.randn(1, generator=g))  # logit-normal(0, 1), as diffusers' SD3 script draws it
    index = int(u * 1000)
    noise = torch.randn(4, 8, 8, generator=g)
    latents = setup.pipe.encode(batch["pixels"][:1, 0], [g])
    sigma = setup.process.scheduler.sigmas[index]
    assert timesteps[0] == setup.process.scheduler.timesteps[index]
    torch.testing.assert_close(noisy[0], (1 - sigma) * latents[0] + sigma * noise)
    torch.testing.assert_close(target[0], noise - latents[0])
    with torch.no_grad():
        pred = loop.denoise(setup.pipe.unet, noisy, timesteps, cond)
    ref_err = (pred - target).square().flatten(1).mean(1)
    assert result.records[0]["raw_ref_loss"] == pytest.approx(ref_err.mean().item(), rel=1e-5)


def test_sd3_with_lora_adapts_the_joint_attention(assets, sd3, tmp_path):
    from fdiv_kernels.train.lora import WEIGHT_NAME, load_lora

    result = train(config(assets, tmp_path / "run", pipeline=sd3, max_steps=2, lora_rank=2, learning_rate=1e-2))
    assert result.records[0]["raw_model_loss"] == pytest.approx(result.records[0]["raw_ref_loss"], rel=1e-6)
    saved = load_file(tmp_path / "run" / "lora" / WEIGHT_NAME)
    assert all(k.startswith("transformer.") for k in saved)
    assert any(".attn.add_q_proj." in k for k in saved) and any(".attn.to_q." in k for k in saved)
    model = load_lora(load_pipeline(sd3).unet, tmp_path / "run" / "lora", "transformer")
    loaded = dict(model.named_modules())["transformer_blocks.0.attn.to_q"].lora_B["default_0"].weight
    assert torch.equal(loaded, saved["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"])
    assert loaded.abs().max() > 0  # trained: peft starts B at zero


def test_flow_transformer_refuses_other_targets_and_sd3_needs_its_parts(assets, sd3, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(
        ValueError,
        match=r"--prediction-type epsilon: .*SD3Transformer2DModel is a flow-matching "
        r"model and trains on the flow target",
    ):
        train(config(assets, out, pipeline=sd3, prediction_type="epsilon"))
    with pytest.raises(ValueError, match=r"--snr-gamma \(Min-SNR\) needs an epsilon or v_prediction target"):
        train(config(assets, out, pipeline=sd3, snr_gamma=5.0))
    with pytest.raises(
        ValueError,
        match=r"--weighting-scheme cosmap is for flow-matching targets; this run's "
        r"target is epsilon",
    ):
        train(config(assets, out, weighting_scheme="cosmap"))
    broken = tmp_path / "broken"
    shutil.copytree(sd3, broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"an SD3 pipeline needs .*; it lacks \['text_encoder_2'\]"):
        train(config(assets, out, pipeline=broken))
    config_file = json.loads((broken / "transformer" / "config.json").read_text())
    config_file["_class_name"] = "FluxTransformer2DModel"
    (broken / "transformer" / "config.json").write_text(json.dumps(config_file))
    with pytest.raises(ValueError, match=r"the denoiser is 'FluxTransformer2DModel'.*Flux and other transformers"):
        train(config(assets, out, pipeline=broken))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# Memory and speed switches, timestep weighting


def _capture_pair_weights(monkeypatch) -> list:
    seen = []
    loss = loop.fused_fdpo_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("pair_weight"))
        return loss(*args, **kwargs)

    monkeypatch.setattr(loop, "fused_fdpo_loss", spy)
    return seen


def _first_batch(assets, cfg: TrainConfig):
    setup = loop.prepare_run(cfg)
    stream = loop.PairStream(setup.pairs, cfg.seed, cfg.batch_size)
    batch = torch.utils.data.default_collate([stream[i] for i in range(cfg.batch_size)])
    return setup, loop.noised_batch(setup, batch, cfg.seed, torch.device("cpu"))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_reach_the_loss(assets, tmp_path, monkeypatch, prediction_type):
    seen = _capture_pair_weights(monkeypatch)
    cfg = config(assets, tmp_path / "run", max_steps=1, snr_gamma=5.0, prediction_type=prediction_type)
    train(cfg)
    setup, (_, timesteps, _, _) = _first_batch(assets, cfg)
    # By hand: SNR = alpha_bar / (1 - alpha_bar) at each pair's timestep (the test pipeline: 100 DDPM steps).
    alpha_bar = setup.process.scheduler.alphas_cumprod[timesteps[:4]]
    snr = alpha_bar / (1 - alpha_bar)
    expected = snr.clamp(max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    assert expected.min() < 0.9  # the draw includes timesteps the weighting changes
    torch.testing.assert_close(seen[-1], expected)  # the step's call (flag checks may call the loss too)
    assert loop.TimestepSampler(setup.process).pair_weight(timesteps[:4]) is None  # unweighted by default


def test_huge_snr_gamma_changes_nothing_small_changes_the_run(assets, tmp_path):
    plain = train(config(assets, tmp_path / "plain", max_steps=2))
    huge = train(config(assets, tmp_path / "huge", max_steps=2, snr_gamma=1e30))  # weights min(snr, g)/snr = 1
    assert huge.records == plain.records
    small = train(config(assets, tmp_path / "small", max_steps=2, snr_gamma=0.01))
    assert small.records[1]["loss"] != pytest.approx(plain.records[1]["loss"], rel=1e-4)


def test_flow_cosmap_weights_and_sigma_sqrt_reach_the_loss(assets, sd3, tmp_path, monkeypatch):
    seen = _capture_pair_weights(monkeypatch)
    for scheme in ("cosmap", "sigma_sqrt"):
        cfg = config(assets, tmp_path / scheme, pipeline=sd3, max_steps=1, weighting_scheme=scheme)
        train(cfg)
        setup, (_, timesteps, _, _) = _first_batch(assets, cfg)
        sigma = timesteps[:4] / 1000  # flow-matching timesteps are sigma * num_train_timesteps
        expected = 2 / (torch.pi * (1 - 2 * sigma + 2 * sigma**2)) if scheme == "cosmap" else sigma**-2.0
        torch.testing.assert_close(seen[-1], expected.float())


def test_gradient_checkpointing_recomputes_and_gives_the_same_run(assets, tmp_path, monkeypatch):
    from fdiv_kernels.train.model import speed_switches

    calls = {"n": 0}
    unet = load_pipeline(assets["pipeline"]).unet.train()
    resnet = unet.down_blocks[0].resnets[0]  # diffusers checkpoints each resnet and transformer block
    forward = resnet.forward

    def counted(*args, **kwargs):  # (torch's recomputation does not fire forward hooks: count the calls)
        calls["n"] += 1
        return forward(*args, **kwargs)

    resnet.forward = counted
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([3, 50]), torch.randn(2, 6, 16)
    unet(x, t, cond).sample.square().mean().backward()
    assert calls["n"] == 1
    speed_switches(unet, gradient_checkpointing=True)
    calls["n"] = 0
    unet(x, t, cond).sample.square().mean().backward()
    assert calls["n"] == 2  # forward, then again in the backward pass
    for run, flags in (("plain", {}), ("ckpt", {"gradient_checkpointing": True})):
        record_steps(tmp_path / f"{run}-steps", monkeypatch.setattr)
        train(config(assets, tmp_path / run, max_steps=2, **flags))
    steps = [read_steps(tmp_path / f"{run}-steps") for run in ("plain", "ckpt")]
    assert_runs_match(tmp_path / "plain", tmp_path / "ckpt", *steps)


def test_compile_compiles_the_model_and_gives_the_same_run(assets, tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # Cached reference errors: one model to compile, which keeps this test short (dynamo traces the whole UNet).
    cache = loop.cache_reference_errors(config(assets, tmp_path / "unused", max_steps=1), tmp_path / "ref.safetensors")
    plain = train(config(assets, tmp_path / "plain", max_steps=1, ref_errors=cache))
    compiled = train(
        config(assets, tmp_path / "compiled", max_steps=1, ref_errors=cache, compile=True, compile_backend="eager")
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert compiled.records[0]["raw_model_loss"] == pytest.approx(plain.records[0]["raw_model_loss"], rel=1e-5)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=r"--compile-backend 'nope': torch.compile knows"):
        config(assets, tmp_path / "x", compile=True, compile_backend="nope")


# ---------------------------------------------------------------------------------------------------------------
# Several processes (gloo on CPU), as tests/test_train.py checks full fine-tuning


@pytest.mark.parametrize("mode", ["lora", "sd3"])
def test_two_processes_match_one_process(assets, sd3, tmp_path, monkeypatch, mode):
    pipeline = sd3 if mode == "sd3" else assets["pipeline"]
    common = ["train", *_cli_data(assets), "--pipeline", str(pipeline), "--max-steps", "2", "--learning-rate", "1e-3"]
    if mode == "lora":
        common += ["--learning-rate", "1e-2", "--lora-rank", "2"]  # (the last --learning-rate counts)
    two = run_recorded([*common, "--output", str(tmp_path / "two")], tmp_path, TWO_CPU_PROCESSES, tmp_path / "s2")
    assert two.returncode == 0, two.stderr[-3000:]
    # The one-process run in this process (the same flags; a subprocess only costs start-up time).
    lora = {"learning_rate": 1e-2, "lora_rank": 2} if mode == "lora" else {}
    record_steps(tmp_path / "s1", monkeypatch.setattr)
    train(config(assets, tmp_path / "one", pipeline=pipeline, max_steps=2, **lora))
    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["distributed_backend"] == "gloo"
    steps_two = read_steps(tmp_path / "s2")
    assert_runs_match(tmp_path / "one", tmp_path / "two", read_steps(tmp_path / "s1"), steps_two)
    assert_gradients_synchronised(steps_two)
    assert_same_trained_model(pipeline, assets["dataset"], tmp_path / "one", tmp_path / "two")


# ---------------------------------------------------------------------------------------------------------------
# SDXL: two text encoders, pooled embeddings, micro-conditioning


def make_sdxl_pipeline(folder: Path) -> Path:
    """A tiny StableDiffusionXLPipeline folder: text_time UNet, tiny VAE (16 px -> 4x8x8), two tiny CLIP encoders."""
    transformers = pytest.importorskip("transformers")
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    parts = {}
    for suffix, cls in (("", transformers.CLIPTextModel), ("_2", transformers.CLIPTextModelWithProjection)):
        tokenizer, vocab_size = _char_clip_tokenizer(folder.parent / f"{folder.name}-tok{suffix}")
        text_config = tiny_clip_config(vocab_size)
        parts[f"text_encoder{suffix}"], parts[f"tokenizer{suffix}"] = cls(text_config), tokenizer
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4,
    )
    StableDiffusionXLPipeline(
        unet=unet,
        scheduler=DDPMScheduler(num_train_timesteps=100),
        vae=tiny_vae(),
        **parts,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sdxl(assets):
    return make_sdxl_pipeline(assets["root"] / "sdxl")


def test_sdxl_conditioning_is_diffusers_own_with_micro_conditioning(sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = load_pipeline(sdxl)
    cond = pipe.text(["a red cat", "a dog"], torch.device("cpu"))
    absent = dict.fromkeys(["image_encoder", "feature_extractor"])
    states, _, pooled, _ = StableDiffusionXLPipeline.from_pretrained(sdxl, **absent).encode_prompt(
        ["a red cat", "a dog"], do_classifier_free_guidance=False
    )
    assert states.shape == (2, 24, 16) and pooled.shape == (2, 8)  # both encoders' states; the second's projection
    assert torch.equal(cond["encoder_hidden_states"], states)
    assert torch.equal(cond["added_cond_kwargs"]["text_embeds"], pooled)
    # (original size, crop top-left, target size) of the 16 px training images.
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2


def test_sdxl_trains_full_and_lora(assets, sdxl, tmp_path, monkeypatch):
    record_steps(tmp_path / "steps", monkeypatch.setattr)
    full = train(config(assets, tmp_path / "full", pipeline=sdxl, max_steps=2))
    # At the reference, up to float rounding: the frozen copy runs without autograd, which may pick other kernels.
    assert_starts_at_reference(tmp_path / "full", read_steps(tmp_path / "steps"))
    tuned = load_pipeline(sdxl, unet=tmp_path / "full" / "unet")
    base = load_pipeline(sdxl)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.unet.parameters(), base.unet.parameters()))
    lora = train(config(assets, tmp_path / "lora", pipeline=sdxl, max_steps=2, lora_rank=2))
    for a, b in zip(full.records, lora.records):  # the same reference: the base SDXL UNet
        assert b["raw_ref_loss"] == pytest.approx(a["raw_ref_loss"], rel=1e-6)
    saved = load_file(tmp_path / "lora" / "lora" / "pytorch_lora_weights.safetensors")
    assert saved and all(k.startswith("unet.") for k in saved)


def test_sdxl_without_its_parts_is_refused_before_anything_is_written(assets, sdxl, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sdxl, broken)
    unet_config = json.loads((broken / "unet" / "config.json").read_text())
    (broken / "unet" / "config.json").write_text(json.dumps({**unet_config, "addition_embed_type": None}))
    out = tmp_path / "run"
    with pytest.raises(
        ValueError,
        match=r"two text encoders \(SDXL\) needs a UNet2DConditionModel with "
        r"addition_embed_type 'text_time'",
    ):
        train(config(assets, out, pipeline=broken))
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "tokenizer_2": [None, None]}))
    with pytest.raises(ValueError, match=r"an SDXL pipeline needs .*; it lacks \['tokenizer_2'\]"):
        train(config(assets, out, pipeline=broken))
    assert not out.exists()
