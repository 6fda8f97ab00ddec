"""No silent wrong answer in the training commands: stale caches, changed flags on resume, damaged checkpoints,
bad flags and bad data, each refused before anything is written, in one line that names the file, row or flag.

Tiny models and datasets built here (the builders of test_train.py); runs of 1-3 steps.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from train_helpers import ROOT, cli_error, config, make_dataset, make_pipeline, read_log, train_argv

from fdiv_kernels.train.cli import main
from fdiv_kernels.train.data import DatasetError, PreferenceDataset
from fdiv_kernels.train.io import atomic_folder, lock_folder, unlock_folder, write_checksums
from fdiv_kernels.train.loop import RESUME_MAY_CHANGE, TrainConfig, cache_reference_errors, train
from fdpo_study.cli import main as study_main


@pytest.fixture(scope="module")
def run_with_checkpoints(assets):
    """A finished 2-step run with checkpoint-1 and checkpoint-2 (copy it before changing it)."""
    out = assets["root"] / "run"
    train(config(assets, out, max_steps=2, checkpoint_every=1))
    return out


def _copy_run(run: Path, tmp_path: Path, drop=("unet",)) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    for name in drop:
        shutil.rmtree(out / name)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Every flag is checked before anything is written.


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--beta", "-5"], "--beta must be > 0"),
        (["--beta", "nan"], "--beta must be a finite number"),
        (["--beta", "inf"], "--beta must be a finite number"),
        (["--gamma", "0"], "--gamma must be > 0"),
        (["--label-smoothing", "0.7"], "--label-smoothing must be < 0.5"),
        (["--resolution", "-16"], "--resolution must be >= 1"),
        (["--resolution", "0"], "--resolution must be >= 1"),
        (["--log-every", "0"], "--log-every must be >= 1"),
        (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
        (["--learning-rate", "nan"], "--learning-rate must be a finite number"),
        (["--adam-beta2", "1"], "--adam-beta2 must be < 1"),
        (["--max-grad-norm", "-1"], "--max-grad-norm must be >= 0"),
    ],
)
def test_bad_train_flags_fail_before_anything_is_written(assets, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert message in cli_error(train_argv(assets, out, *flags), capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["make-pairs", "--pairs", "0"], "--pairs must be an integer >= 1; got 0"),
        (["make-pairs", "--pairs", "-4"], "--pairs must be an integer >= 1; got -4"),
        (["make-pairs", "--sampling-steps", "0"], "--sampling-steps must be an integer >= 1"),
        (["pretrain", "--batch-size", "0"], "--batch-size must be an integer >= 1"),
        (["pretrain", "--steps", "0"], "--steps must be an integer >= 1"),
        (["study", "--quick", "--beta", "-1"], "--beta must be a finite number > 0"),
        (["study", "--quick", "--gamma", "nan"], "--gamma must be a finite number"),
        (["study", "--quick", "--base", "no-such-base"], "--base no-such-base is not a pipeline folder"),
        (["study", "--frontier", "--quick", "--base", "nowhere"], "--base nowhere is not a pipeline folder"),
    ],
)
def test_bad_flags_of_the_other_commands(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert message in cli_error([*argv, "--output", str(out)], capsys, study_main)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["pretrain", "make-pairs", "study", "train"])
def test_output_naming_an_existing_file_is_refused(assets, tmp_path, capsys, command):
    out = tmp_path / "file.txt"
    out.write_text("keep")
    argv = train_argv(assets, out) if command == "train" else [command, "--output", str(out), "--overwrite"]
    assert "is a file" in cli_error(argv, capsys, main if command == "train" else study_main)
    assert out.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_ref_errors_output_naming_a_folder_is_refused(assets, tmp_path, capsys):
    argv = [
        "ref-errors",
        "--pipeline",
        str(assets["pipeline"]),
        "--dataset",
        str(assets["dataset"]),
        "--output",
        str(tmp_path),
        "--cpu",
        "--no-progress",
    ]
    assert "already exists (a folder; --output names the cache file" in cli_error(argv, capsys)


def test_numpy_numbers_are_numbers():
    import numpy as np

    cfg = TrainConfig(
        pipeline="p", dataset="d", output="o", beta=np.float32(2500), gamma=np.float64(2), max_steps=np.int64(3)
    )
    assert cfg.beta == 2500


# ---------------------------------------------------------------------------------------------------------------
# Bad data: one line naming the file or row.


def _truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(torch.randint(0, 256, (24, 20, 3), dtype=torch.uint8).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()[:-30]


def test_truncated_png_is_named(assets, tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    (data / "images" / "2_1.jpg").write_bytes(_truncated_png())
    with pytest.raises(DatasetError, match=r"images/2_1.jpg: not a readable image, it fails PIL's verification"):
        PreferenceDataset(data, 16)
    out = tmp_path / "run"
    argv = train_argv(assets, out)
    argv[argv.index("--dataset") + 1] = str(data)
    assert "images/2_1.jpg: not a readable image" in cli_error(argv, capsys)
    assert not out.exists()


def test_soft_label_is_refused_with_the_rule(tmp_path):
    data = make_dataset(tmp_path / "data", pairs=3, labels=[1.0, 0.7, 0.0])
    with pytest.raises(DatasetError, match=r"row 1: column 'label_0' must be 1, 0 or 0.5; got 0.7 \(soft preference"):
        PreferenceDataset(data, 16)


@pytest.mark.parametrize(
    "caption, message",
    [
        ("a red cat on grass on grass", "has 7 words; this tokenizer takes 6"),
        ("a green cat", "word 'green' is not in the tokenizer's vocabulary"),
    ],
)
def test_captions_the_tokenizer_refuses_fail_before_anything_is_written(assets, tmp_path, caption, message):
    data = make_dataset(tmp_path / "data", pairs=4)
    rows = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines()]
    rows[3]["caption"] = caption
    (data / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    with pytest.raises(DatasetError, match=rf"pairs.jsonl row 3: caption .*{message}"):
        train(config(assets, out, dataset=data))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# An output folder without a checkpoint can be used again.


def test_folder_of_a_run_that_stopped_before_its_first_checkpoint_is_reused(assets, tmp_path, capsys):
    # A dataset with an image that passes the up-front check but fails when read: the run fails at step 1,
    # after train_config.json is written (--no-check-images).
    data = make_dataset(tmp_path / "data", pairs=4)
    good = (data / "images" / "0_0.jpg").read_bytes()
    for name in ("0_0", "0_1", "1_0", "1_1", "2_0", "2_1", "3_0", "3_1"):
        (data / "images" / f"{name}.jpg").write_bytes(b"garbage")
    out = tmp_path / "run"
    with pytest.raises(DatasetError, match="not a readable image"):
        train(config(assets, out, dataset=data, check_images=False, checkpoint_every=1))
    assert (out / "train_config.json").is_file() and not list(out.glob("checkpoint-*"))
    # --resume says what to do; the plain rerun (data fixed) starts the run over in the same folder.
    with pytest.raises(FileNotFoundError, match="holds no checkpoint .* run without --resume to start it over"):
        train(config(assets, out, dataset=data, check_images=False, resume="latest"))
    for image in (data / "images").iterdir():
        image.write_bytes(good)
    result = train(config(assets, out, dataset=data, max_steps=2))
    assert [r["step"] for r in result.records] == [1, 2] and [r["step"] for r in read_log(out)] == [1, 2]
    assert "starting it over" in capsys.readouterr().out
    # A finished run is not overwritten.
    with pytest.raises(FileExistsError, match=r"holds a finished run \(unet/\)"):
        train(config(assets, out, dataset=data))


def test_folder_with_only_a_killed_writers_leftovers_is_used(assets, tmp_path):
    out = tmp_path / "run"
    (out / ".unet.tmp-x1y2").mkdir(parents=True)
    (out / ".train_config.json.tmp").write_text("{")
    train(config(assets, out, max_steps=1))
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "train_config.json", "unet"]


def test_folder_with_checkpoints_needs_resume(run_with_checkpoints, assets):
    with pytest.raises(
        FileExistsError,
        match=r"holds a run with checkpoints \(checkpoint-1, checkpoint-2\): pass "
        "--resume latest",
    ):
        train(config(assets, run_with_checkpoints))


# ---------------------------------------------------------------------------------------------------------------
# Cached reference errors: refused unless they match the run, content included.


@pytest.fixture(scope="module")
def cache(assets):
    return cache_reference_errors(
        config(assets, assets["root"] / "unused", max_steps=2), assets["root"] / "ref.safetensors"
    )


def test_cache_of_a_dataset_regenerated_in_place_is_refused(assets, cache, tmp_path):
    data = make_dataset(tmp_path / "data")
    own = config(assets, tmp_path / "ok", dataset=data, max_steps=2, ref_errors=cache)
    shutil.rmtree(data)
    shutil.copytree(assets["dataset"], data)
    train(own)  # the same content elsewhere: accepted
    # Same captions, labels and pair count, other image bytes: the silent case.
    images = sorted((data / "images").iterdir())
    contents = [image.read_bytes() for image in images]
    for image, content in zip(images, contents[1:] + contents[:1]):
        image.write_bytes(content)
    out = tmp_path / "run"
    with pytest.raises(
        ValueError,
        match=r"was computed on other data .* the captions or images of the pairs it "
        r"covers differ from --dataset",
    ):
        train(config(assets, out, dataset=data, max_steps=2, ref_errors=cache))
    assert not out.exists()


def test_cache_of_other_pipeline_weights_is_refused(assets, cache, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(assets["pipeline"], pipe)
    weights = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"was computed with other pipeline weights or configs"):
        train(config(assets, tmp_path / "run", pipeline=pipe, max_steps=2, ref_errors=cache))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 2, "max_steps": 4}, "was computed with batch_size='4'; this run has '2'"),
        ({"mixed_precision": "bf16"}, "was computed with mixed_precision='no'; this run has 'bf16'"),
        ({"resolution": 8}, "was computed with resolution='16'; this run has '8'"),
        (
            {"prediction_type": "v_prediction"},
            "was computed with prediction_type='epsilon'; this run has 'v_prediction'",
        ),
    ],
)
def test_cache_with_other_settings_is_refused(assets, cache, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(config(assets, tmp_path / "run", **{"max_steps": 2, **overrides}, ref_errors=cache))


def test_cache_with_other_timestep_sampling_is_refused(assets, tmp_path):
    """A flow target's timesteps drawn uniformly (the cache) or from a logit-normal density (the run) are other
    samples: refused. Weighting schemes that only weight uniformly drawn timesteps share the cache."""
    flow = make_pipeline(tmp_path / "flow", scheduler="flow")
    cache = cache_reference_errors(config(assets, tmp_path / "unused", pipeline=flow, max_steps=1), tmp_path / "r")
    train(
        config(assets, tmp_path / "weighted", pipeline=flow, max_steps=1, ref_errors=cache, weighting_scheme="cosmap")
    )
    out = tmp_path / "run"
    with pytest.raises(
        ValueError, match=r"was computed with timestep_sampling='uniform'; this run has 'logit_normal\(mean=0.0"
    ):
        train(config(assets, out, pipeline=flow, max_steps=1, ref_errors=cache, weighting_scheme="logit_normal"))
    assert not out.exists()


def test_damaged_or_old_cache_is_refused(assets, cache, tmp_path):
    from safetensors.torch import load_file, save_file

    errors = load_file(cache)["ref_err"]
    old = tmp_path / "old.safetensors"
    save_file({"ref_err": errors}, old, metadata={"seed": "0", "pairs": "12"})
    with pytest.raises(ValueError, match="records no content hashes"):
        train(config(assets, tmp_path / "a", max_steps=2, ref_errors=old))
    damaged = tmp_path / "damaged.safetensors"
    data = bytearray(cache.read_bytes())
    data[-4:] = bytes(4)
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is damaged: its errors do not match the checksum"):
        train(config(assets, tmp_path / "b", max_steps=2, ref_errors=damaged))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(cache.read_bytes()[:-20])
    with pytest.raises(ValueError, match="is not a readable reference-error cache"):
        train(config(assets, tmp_path / "c", max_steps=2, ref_errors=truncated))


# ---------------------------------------------------------------------------------------------------------------
# Resume: flags that would change the run are refused; the others take effect and are recorded.


def _changed(field: str, assets, tmp_path: Path) -> tuple[dict, str]:
    """A value of ``field`` other than run_with_checkpoints' (and the flags it needs), and what the refusal says."""
    if field == "pipeline":  # compared by content: other weights
        pipe = tmp_path / "pipe"
        shutil.copytree(assets["pipeline"], pipe)
        weights = pipe / "unet" / "diffusion_pytorch_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-8:] = bytes(8)
        weights.write_bytes(bytes(data))
        return {"pipeline": pipe}, "its files differ from those the run started from"
    if field == "dataset":  # compared by content: two rows swapped
        data = tmp_path / "data"
        shutil.copytree(assets["dataset"], data)
        rows = (data / "pairs.jsonl").read_text().splitlines()
        (data / "pairs.jsonl").write_text("\n".join([rows[1], rows[0], *rows[2:]]) + "\n")
        return {"dataset": data}, "its table differs from the run's"
    if field == "ref_errors":  # (refused before the file is read)
        return {"ref_errors": tmp_path / "ref.safetensors"}, "the reference is cached errors"
    if field == "weighting_scheme":  # flow targets only: refused for this run's epsilon target before resuming
        return {"weighting_scheme": "cosmap"}, "--weighting-scheme cosmap is for flow-matching targets"
    values = {
        "divergence": "js",
        "alpha": 0.3,
        "beta": 100.0,
        "gamma": 2.0,
        "label_smoothing": 0.1,
        "prediction_type": "v_prediction",
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-2,
        "lr_warmup_steps": 5,
        "adam_beta1": 0.8,
        "adam_beta2": 0.99,
        "adam_weight_decay": 0.0,
        "adam_epsilon": 1e-6,
        "max_grad_norm": 0.5,
        "mixed_precision": "bf16",
        "resolution": 8,
        "seed": 1,
        "lora_rank": 2,
        "lora_alpha": 4.0,
        "logit_mean": 0.5,
        "logit_std": 2.0,
        "mode_scale": 1.0,
        "snr_gamma": 5.0,
        "fsdp": True,
    }
    overrides = {field: values[field], **({"lora_rank": 2} if field == "lora_alpha" else {})}
    return overrides, f"--{field.replace('_', '-')} {values[field]} (the run has "


# The flags that may change on resume, as docs/training.md lists them (the test's own list: one derived from the
# code's would drop the case of a flag wrongly added there). Every other field fixes the run.
_MAY_CHANGE = {
    *("max_steps", "log_every", "checkpoint_every", "output", "progress", "check_images", "dataloader_workers"),
    *("log_grad_weights", "report_to", "cpu", "xformers", "gradient_checkpointing", "compile", "compile_backend"),
    *("data_backend", "resume"),
}
_FIXED_FIELDS = sorted(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _MAY_CHANGE)


def test_the_flags_that_may_change_on_resume_are_the_documented_ones():
    assert RESUME_MAY_CHANGE == _MAY_CHANGE


@pytest.mark.parametrize("field", _FIXED_FIELDS)
def test_resume_refuses_flags_that_change_the_run(run_with_checkpoints, assets, tmp_path, field):
    out = _copy_run(run_with_checkpoints, tmp_path)
    recorded = (out / "train_config.json").read_text()
    overrides, message = _changed(field, assets, tmp_path)
    refusal = "" if field == "weighting_scheme" else r"--resume .*checkpoint-2: refused, .*"
    with pytest.raises(ValueError, match=rf"{refusal}{re.escape(message)}"):
        train(config(assets, out, max_steps=3, resume="latest", **overrides))
    assert (out / "train_config.json").read_text() == recorded
    assert [r["step"] for r in read_log(out)] == [1, 2]


def test_resume_refuses_a_changed_dataset(run_with_checkpoints, assets, tmp_path):
    out = _copy_run(run_with_checkpoints, tmp_path)
    data = tmp_path / "data"
    shutil.copytree(assets["dataset"], data)
    rows = (data / "pairs.jsonl").read_text().splitlines()
    (data / "pairs.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"has 11 pairs \(the run's had 12\)"):
        train(config(assets, out, dataset=data, max_steps=3, resume="latest"))
    (data / "pairs.jsonl").write_text("\n".join([rows[1], rows[0], *rows[2:]]) + "\n")
    with pytest.raises(ValueError, match=r"its table differs from the run's"):
        train(config(assets, out, dataset=data, max_steps=3, resume="latest"))


def test_resume_applies_and_records_the_flags_that_may_change(run_with_checkpoints, assets, tmp_path):
    out = _copy_run(run_with_checkpoints, tmp_path)
    # The dataset moved (same content), the run is extended, logging and checkpointing change.
    data = tmp_path / "moved"
    shutil.copytree(assets["dataset"], data)
    result = train(config(assets, out, dataset=data, max_steps=3, log_every=3, checkpoint_every=0, resume="latest"))
    assert [r["step"] for r in result.records] == [3]
    recorded = json.loads((out / "train_config.json").read_text())
    assert (recorded["max_steps"], recorded["log_every"], recorded["checkpoint_every"]) == (3, 3, 0)
    assert recorded["dataset"] == str(data.resolve()) and recorded["learning_rate"] == 1e-3
    # The resumed run is the uninterrupted 3-step run.
    full = train(config(assets, tmp_path / "full", max_steps=3))
    assert result.records[0]["loss"] == pytest.approx(full.records[2]["loss"], rel=1e-6)


def test_resume_with_max_steps_below_the_checkpoint_is_refused(run_with_checkpoints, assets, tmp_path, capsys):
    out = _copy_run(run_with_checkpoints, tmp_path)
    recorded = (out / "train_config.json").read_text()
    line = cli_error(
        train_argv(assets, out, "--max-steps", "1", "--learning-rate", "1e-3", "--resume", "latest"), capsys
    )
    assert "--max-steps 1 is below the step of" in line and "pass --max-steps 2 or more" in line
    assert (out / "train_config.json").read_text() == recorded


def test_log_is_cut_back_to_the_checkpoint_on_resume(assets, tmp_path):
    out = tmp_path / "run"
    full = train(config(assets, out, max_steps=3, checkpoint_every=2))
    # Killed after step 3 was logged, before its checkpoint: steps 1-3 in the log, checkpoint-2 the latest.
    shutil.rmtree(out / "checkpoint-3")
    shutil.rmtree(out / "unet")
    with (out / "log.jsonl").open("a") as log:
        log.write('{"step": 4, "loss": 0.')  # and a line cut short
    resumed = train(config(assets, out, max_steps=3, checkpoint_every=2, resume="latest"))
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    assert [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] == full.records
    assert resumed.records == full.records[2:]


# ---------------------------------------------------------------------------------------------------------------
# Damaged checkpoints: refused with the file named and the way out.


def _zero_middle(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    file.write_bytes(bytes(data))


def _edit_state(checkpoint: Path, text: str) -> None:
    """An edit that also rewrites the checksums: the checks behind the checksums must catch it too."""
    (checkpoint / "trainer_state.json").write_text(text)
    write_checksums(checkpoint)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: _zero_middle(c / "model.safetensors"), r"checkpoint-2/model.safetensors is damaged: its sha256"),
        (
            lambda c: (c / "optimizer.bin").write_bytes((c / "optimizer.bin").read_bytes()[:1000]),
            r"checkpoint-2/optimizer.bin is damaged",
        ),
        (lambda c: (c / "model.safetensors").unlink(), r"checkpoint-2/model.safetensors is missing"),
        (lambda c: (c / "trainer_state.json").write_text('{"step": 1'), r"checkpoint-2/trainer_state.json is damaged"),
        (lambda c: (c / "checksums.json").unlink(), r"checkpoint-2 has no checksums.json"),
        (lambda c: (c / "checksums.json").write_text("[garbage"), r"checkpoint-2/checksums.json is damaged"),
        (lambda c: _edit_state(c, "garbage"), r"checkpoint-2/trainer_state.json is not valid JSON"),
        (lambda c: _edit_state(c, '{"step": "two"}'), r"'step' must be a positive integer; got 'two'"),
        (
            lambda c: _edit_state(c, json.dumps({**json.loads((c / "trainer_state.json").read_text()), "step": 1})),
            r"trainer_state.json says step 1 but the folder is checkpoint-2",
        ),
    ],
)
def test_damaged_checkpoint_is_refused_naming_the_file(run_with_checkpoints, assets, tmp_path, capsys, damage, message):
    out = _copy_run(run_with_checkpoints, tmp_path)
    damage(out / "checkpoint-2")
    recorded = (out / "train_config.json").read_text()
    line = cli_error(train_argv(assets, out, "--learning-rate", "1e-3", "--resume", "latest"), capsys)
    assert re.search(message, line), line
    assert f"--resume {out / 'checkpoint-1'}" in line  # the way out: the earlier checkpoint
    assert (out / "train_config.json").read_text() == recorded


def test_checkpoint_that_passes_its_checksums_but_does_not_load_is_named(run_with_checkpoints, assets, tmp_path):
    out = _copy_run(run_with_checkpoints, tmp_path)
    checkpoint = out / "checkpoint-2"
    (checkpoint / "optimizer.bin").write_bytes(b"not a pickle")
    write_checksums(checkpoint)
    with pytest.raises(ValueError, match=r"checkpoint-2: its files pass their checksums but cannot be loaded"):
        train(config(assets, out, resume="latest"))


def test_folders_that_are_not_checkpoints_are_ignored(run_with_checkpoints, assets, tmp_path):
    out = _copy_run(run_with_checkpoints, tmp_path)
    shutil.copytree(out / "checkpoint-1", out / "checkpoint-best")
    result = train(config(assets, out, max_steps=3, resume="latest"))
    assert [r["step"] for r in result.records] == [3]


# ---------------------------------------------------------------------------------------------------------------
# Temporary folders of killed writers are removed.


def test_leftover_temporary_folders_are_removed_unless_a_live_writer_holds_them(tmp_path):
    stale, live = tmp_path / ".study.tmp-dead", tmp_path / ".study.tmp-alive"
    stale.mkdir()
    (stale / "half.json").write_text("{")
    live.mkdir()
    lock = lock_folder(live)
    try:
        with atomic_folder(tmp_path / "study") as tmp:
            (tmp / "done").write_text("1")
        assert not stale.exists() and live.exists()
    finally:
        unlock_folder(lock)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".study.tmp-alive", "study"]


def test_resume_removes_a_killed_runs_temporary_folders(run_with_checkpoints, assets, tmp_path):
    out = _copy_run(run_with_checkpoints, tmp_path)
    for name in (".unet.tmp-abc123", ".checkpoint-3.tmp"):
        (out / name).mkdir()
        (out / name / "model.safetensors").write_bytes(b"half")
    train(config(assets, out, max_steps=3, resume="latest"))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_sigterm_exits_through_the_cleanup(tmp_path, monkeypatch):
    """SIGTERM in the middle of a command's write: SystemExit(143), and the temporary folder is gone."""
    from fdpo_study import study

    seen = []

    def interrupted_study(cfg, overwrite=False):
        with atomic_folder(cfg.output) as tmp:
            (tmp / "study.json").write_text("{")
            seen.append(tmp)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler raises before this ends

    monkeypatch.setattr(study, "run_study", interrupted_study)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        study_main(["study", "--quick", "--no-progress", "--output", str(tmp_path / "study")])
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert seen and list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before


_WRITER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("trainio", sys.argv[1])
trainio = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trainio)
with trainio.atomic_folder(sys.argv[2]) as tmp:
    print(tmp, flush=True)
    time.sleep(60)
"""


def test_a_killed_writers_folder_is_removed_by_the_next_writer(tmp_path):
    # kill -9 runs no cleanup: the folder stays, unlocked, and the next writer of that output removes it.
    io_module = ROOT / "fdiv_kernels" / "train" / "io.py"
    out = tmp_path / "study"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(io_module), str(out)], stdout=subprocess.PIPE, text=True
    )
    leftover = Path(writer.stdout.readline().strip())
    assert leftover.parent == tmp_path and leftover.name.startswith(".study.tmp-")
    with atomic_folder(tmp_path / "other"):  # a live writer's folder is left alone
        pass
    assert leftover.exists()
    writer.kill()
    writer.wait(timeout=60)
    writer.stdout.close()
    assert leftover.exists()
    with atomic_folder(out):
        pass
    assert not leftover.exists() and out.is_dir()


# ---------------------------------------------------------------------------------------------------------------
# One writer per output folder: a live run's folder is refused, a dead run's folder is taken over.

_LOCK_HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("trainio", sys.argv[1])
trainio = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trainio)
trainio.WriterLock(sys.argv[2], "train").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s writer lock (as a live ``train`` into it does) until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(ROOT / "fdiv_kernels" / "train" / "io.py"), str(folder)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _kill(holder: subprocess.Popen) -> None:
    holder.kill()  # kill -9: no cleanup runs, its pid file stays behind
    holder.wait(timeout=60)
    holder.stdout.close()


def test_a_second_run_on_a_live_folder_is_refused_before_anything_is_written(
    run_with_checkpoints, assets, tmp_path, capsys
):
    # The case: a live run before its first checkpoint (train_config.json and log.jsonl only); a second
    # run there used to delete the log ("starting it over there") and both appended to it.
    out = _copy_run(run_with_checkpoints, tmp_path, drop=("unet", "checkpoint-1", "checkpoint-2"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    holder = _hold_lock(out)
    try:
        for extra in ((), ("--resume", "latest")):
            line = cli_error(train_argv(assets, out, "--learning-rate", "1e-3", *extra), capsys)
            assert f"{out} is in use: another process (pid {holder.pid}, train) is writing to it" in line, line
            assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".writer.pid"} == before
    finally:
        _kill(holder)


def test_train_holds_its_folder_until_it_ends(assets, tmp_path, monkeypatch):
    from fdiv_kernels.train import loop
    from fdiv_kernels.train.io import FolderInUseError, WriterLock

    out, seen = tmp_path / "run", []
    real_save = loop._save_unet

    def save_and_try_a_second_writer(accelerator, unet, output):
        with pytest.raises(FolderInUseError, match=rf"another process \(pid {os.getpid()}, train\)"):
            WriterLock(output, "train").acquire()
        seen.append(output)
        real_save(accelerator, unet, output)

    monkeypatch.setattr(loop, "_save_unet", save_and_try_a_second_writer)
    train(config(assets, out, max_steps=1))  # a new folder: locked once made
    assert seen == [out]
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "train_config.json", "unet"]  # pid file gone
    with WriterLock(out, "train"):  # released
        pass


def test_the_folder_of_a_killed_run_is_recognised_and_resumed(run_with_checkpoints, assets, tmp_path, capsys):
    out = _copy_run(run_with_checkpoints, tmp_path)
    _kill(holder := _hold_lock(out))
    assert (out / ".writer.pid").read_text().startswith(f"{holder.pid} ")  # a stale lock: the pid of a dead run
    result = train(config(assets, out, max_steps=3, resume="latest"))
    assert [r["step"] for r in result.records] == [3] and [r["step"] for r in read_log(out)] == [1, 2, 3]
    assert f"was left by a writer that is no longer running (pid {holder.pid}, train)" in capsys.readouterr().out
    assert not (out / ".writer.pid").exists()


# ---------------------------------------------------------------------------------------------------------------
# A full disk: one line naming the file that could not be written and the checkpoint to continue from.

_NO_SPACE = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def _full_disk(monkeypatch, where: str, output: Path) -> None:
    """Make the writes of ``where`` fail as on a full disk (what safetensors and Python raise then)."""
    from safetensors import SafetensorError

    def no_space(*args, **kwargs):
        raise SafetensorError(_NO_SPACE)

    if where == "checkpoint-2":  # accelerate's save_state writes the model with its own safetensors import
        import accelerate.utils.other

        real = accelerate.utils.other.safe_save_file
        monkeypatch.setattr(
            accelerate.utils.other,
            "safe_save_file",
            lambda obj, f, **kw: no_space() if ".checkpoint-2.tmp" in str(f) else real(obj, f, **kw),
        )
    elif where == "unet":  # diffusers' save_pretrained
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    else:  # the log, appended to at every logged step
        real_open = Path.open

        def open_(self, mode="r", *args, **kwargs):
            if self == output / "log.jsonl" and mode == "a":
                raise OSError(28, "No space left on device")
            return real_open(self, mode, *args, **kwargs)

        monkeypatch.setattr(Path, "open", open_)


@pytest.mark.parametrize(
    "where, flags, message, next_step",
    [
        (
            "checkpoint-2",
            ["--checkpoint-every", "1"],
            r"no space left on device \(SafetensorError: Error while serializing: IoError",
            "the last good checkpoint is {out}/checkpoint-1: once there is space, continue with --resume latest",
        ),
        (
            "unet",
            ["--checkpoint-every", "2"],
            r"no space left on device \(SafetensorError",
            "the last good checkpoint is {out}/checkpoint-2: once there is space, continue with --resume latest",
        ),
        (
            "log.jsonl",
            [],
            r"no space left on device \(OSError: \[Errno 28\] No space left on device\)",
            "no checkpoint of this run was written: once there is space, run it again (it starts over)",
        ),
    ],
)
def test_a_full_disk_is_reported_with_the_checkpoint_to_continue_from(
    assets, tmp_path, capsys, monkeypatch, where, flags, message, next_step
):
    out = tmp_path / "run"
    _full_disk(monkeypatch, where, out)
    line = cli_error(train_argv(assets, out, "--learning-rate", "1e-3", *flags), capsys)
    assert line.startswith(f"fdpo-train train: error: could not write {out / where}: "), line
    assert re.search(message, line) and line.rstrip().endswith(next_step.format(out=out)), line
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no half-written folder, lock released
    if where == "checkpoint-2":  # space again: the run continues from checkpoint-1, as it says
        monkeypatch.undo()
        train(config(assets, out, max_steps=2, checkpoint_every=1, resume="latest"))
        assert [r["step"] for r in read_log(out)] == [1, 2] and (out / "unet").is_dir()


# ---------------------------------------------------------------------------------------------------------------
# Bad --config files and bad tables: one line naming the file, key or line.


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("run.yaml", b"pipeline: null\n", r"--config {path}: pipeline \(flag --pipeline\) needs a value; got null"),
        ("run.json", b'{"max_steps": null}', r"--config {path}: max_steps \(flag --max-steps\) needs a value"),
        ("run.yaml", "max_steps: 2 # \u00e9tapes\n".encode("latin-1"), r"--config {path} is not UTF-8 text \(byte"),
    ],
)
def test_bad_config_files_are_named(assets, tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "run"
    argv = [a for a in train_argv(assets, out) if a not in ("--pipeline", str(assets["pipeline"]))]
    line = cli_error([*argv, "--config", str(path)], capsys)
    assert re.search(message.format(path=re.escape(str(path))), line), line
    assert not out.exists()


def test_a_jsonl_table_holding_a_json_array_is_named(assets, tmp_path, capsys):
    data = make_dataset(tmp_path / "data", pairs=2)
    rows = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines()]
    (data / "pairs.jsonl").write_text(json.dumps(rows) + "\n")
    out = tmp_path / "run"
    argv = train_argv(assets, out)
    argv[argv.index("--dataset") + 1] = str(data)
    line = cli_error(argv, capsys)
    assert f"{data / 'pairs.jsonl'} line 1 holds an array, not a row: a .jsonl table is one JSON object" in line
    assert not out.exists()


@pytest.mark.parametrize("backend", ["datasets", "memory"])
def test_an_empty_parquet_table_is_called_empty(assets, tmp_path, capsys, backend):
    import pyarrow as pa
    import pyarrow.parquet as pq

    no_rows, no_bytes = tmp_path / "no_rows", tmp_path / "no_bytes"
    no_rows.mkdir()
    no_bytes.mkdir()
    columns = {"caption": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64()}
    pq.write_table(pa.table({k: pa.array([], t) for k, t in columns.items()}), no_rows / "pairs.parquet")
    (no_bytes / "pairs.parquet").write_bytes(b"")
    out = tmp_path / "run"
    for data, message in (
        (no_rows, f"{no_rows}: no preference pairs (the table has no rows)"),
        (no_bytes, f"{no_bytes / 'pairs.parquet'} is empty (0 bytes): no parquet table in it"),
    ):
        argv = train_argv(assets, out, "--data-backend", backend)
        argv[argv.index("--dataset") + 1] = str(data)
        assert message in cli_error(argv, capsys)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# The study's reports on damaged JSON: the file named, not a bare JSONDecodeError, KeyError or TypeError.


def _cut(path: Path) -> None:
    path.write_text(path.read_text()[:50])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: _cut(r / "study.json"), r"study\.json is not valid JSON, damaged or cut short \(Expecting"),
        (lambda r: (r / "seed1.json").write_text("[]"), r"seed1\.json: expected a JSON object, got list"),
        (lambda r: (r / "study.json").write_text("{}"), r"study\.json: not the layout expected.*KeyError"),
        (
            lambda r: (r / "frontier" / "frontier.json").write_text('{"rows": 5, "frontiers": 1}'),
            r"frontier/frontier\.json(, .*)?: not the layout expected, a field is missing or of the wrong type",
        ),
        (
            lambda r: (r / "frontier_pilot.jsonl").write_text('{"div": "js"}\n{"div": '),
            r"frontier_pilot\.jsonl line 2 is not valid JSON",
        ),
    ],
)
def test_study_report_names_the_damaged_file(tmp_path, capsys, damage, message):
    results = tmp_path / "study"
    shutil.copytree(ROOT / "results" / "study", results, ignore=shutil.ignore_patterns("*.png"))
    damage(results)
    line = cli_error(["study-report", "--results", str(results), "--check"], capsys, study_main)
    assert re.search(message, line) and str(results) in line, line


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: _cut(f / "results" / "js_g100_s4.json"), r"js_g100_s4\.json is not valid JSON, damaged or cut"),
        (lambda f: (f / "results" / "base_s0.json").write_text("[1]"), r"base_s0\.json: expected a JSON object"),
        (
            lambda f: (f / "results" / "js_g1_s2.json").write_text(
                json.dumps({**json.loads((f / "results" / "js_g1_s2.json").read_text()), "final_train": None})
            ),
            r"js_g1_s2\.json: not the layout expected.*TypeError",
        ),
        (
            lambda f: (f / "results" / "reverse_kl_g3_s1.json").write_text(
                json.dumps({**json.loads((f / "results" / "reverse_kl_g3_s1.json").read_text()), "metrics": []})
            ),
            r"reverse_kl_g3_s1\.json: not the layout expected.*AttributeError",
        ),
    ],
)
def test_frontier_report_only_names_the_damaged_file(tmp_path, capsys, damage, message):
    folder = tmp_path / "frontier"
    shutil.copytree(ROOT / "results" / "study" / "frontier", folder, ignore=shutil.ignore_patterns("*.png"))
    damage(folder)
    line = cli_error(
        ["study", "--frontier", "--report-only", "--no-progress", "--output", str(folder)], capsys, study_main
    )
    assert re.search(message, line) and str(folder / "results") in line, line
