"""What the training tests share: tiny pipelines and preference datasets laid out the way diffusers and Pick-a-Pic
lay them out (no downloads), the config and flags of a short CPU run, the CLI runners, and the comparison of two
runs' logs. The ``assets`` fixture that builds them once per test module lives in conftest.py."""

from __future__ import annotations

import io
import json
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [*launcher, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def assert_logs_match(one: Path, two: Path) -> None:
    """Two runs of the same training (one process and two, say) logged the same numbers up to float rounding.

    At the first step the policy is the reference, so every logit is rounding noise (|logit| ~ 1e-4 at beta 5000,
    from summation orders that a batch split over processes changes). What is a function of the logits is then
    compared as a tie: the loss and the reward margin to within 1e-3 of each other (both runs' margins within
    1e-3 of 0), and implicit_acc, the fraction of positive logits, not at all (a coin toss per pair). The errors
    (raw losses) are compared tightly at every step, and everything from the second step on."""
    logs = read_log(one), read_log(two)
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] and len(logs[0]) >= 2
    assert abs(logs[0][0]["reward_margin"]) < 1e-3 and abs(logs[1][0]["reward_margin"]) < 1e-3, (logs[0][0], logs[1][0])
    for a, b in zip(*logs):
        for key in LOGGED:
            if a["step"] == 1 and key == "implicit_acc":
                continue
            if a["step"] == 1 and key in ("loss", "reward_margin"):
                assert b[key] == pytest.approx(a[key], rel=0, abs=1e-3), (a["step"], key)
            else:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)


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
