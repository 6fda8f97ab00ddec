"""Training modes beyond full fine-tuning of an SD1.x UNet: LoRA, config files and trackers, flow transformers,
memory/speed switches. Tiny models built here (no downloads), 1-3 steps each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import ModelMixin
from safetensors import safe_open
from safetensors.torch import load_file

from fdiv_kernels.train import loop
from fdiv_kernels.train.cli import main
from fdiv_kernels.train.loop import TrainConfig, train
from fdiv_kernels.train.model import load_pipeline

from test_train import config, make_dataset, make_pipeline  # noqa: F401  (the tiny SD1.x-shaped builders)

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    return {"pipeline": make_pipeline(root / "pipe"), "dataset": make_dataset(root / "data"), "root": root}


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# LoRA


def test_lora_reference_is_the_base_model_with_adapters_off(assets, tmp_path, monkeypatch):
    full = train(config(assets, tmp_path / "full", max_steps=2))

    deepcopy = loop.copy.deepcopy

    def no_model_copy(obj, *args):
        assert not isinstance(obj, ModelMixin), "LoRA must not copy the denoiser for the reference"
        return deepcopy(obj, *args)

    monkeypatch.setattr(loop.copy, "deepcopy", no_model_copy)
    lora = train(config(assets, tmp_path / "lora", max_steps=2, lora_rank=4, learning_rate=1e-2))
    # The reference is the untouched base: the same reference errors as the full fine-tune's frozen copy, on
    # the same samples, noise and timesteps, at every step (also after the adapters have moved).
    for a, b in zip(full.records, lora.records):
        assert b["raw_ref_loss"] == pytest.approx(a["raw_ref_loss"], rel=1e-6)
    # peft starts B at zero: step 1 is at the reference (loss log 2); then the adapters, and only they, moved it.
    assert lora.records[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert lora.records[0]["raw_model_loss"] == pytest.approx(lora.records[0]["raw_ref_loss"], rel=1e-6)
    assert lora.records[1]["raw_model_loss"] != pytest.approx(lora.records[1]["raw_ref_loss"], rel=1e-6)
    assert not (tmp_path / "lora" / "unet").exists()


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
    with pytest.raises(SystemExit):
        main(["train", "--pipeline", str(assets["pipeline"]), "--dataset", str(assets["dataset"]),
              "--output", str(out), "--lora-rank", "0", "--cpu"])
    assert "fdpo-train train: error: --lora-rank must be a positive integer; got 0" in capsys.readouterr().err
    assert not out.exists()


def test_lora_on_a_model_without_attention_names_the_pipeline(tmp_path):
    from fdiv_kernels.train.lora import add_lora

    with pytest.raises(ValueError, match=r"--lora-rank: pipe's denoiser has no attention projections"):
        add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), 4, where="pipe's denoiser")
