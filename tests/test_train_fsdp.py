"""``--fsdp``: the trained model sharded with FSDP2 (``fully_shard``) over two gloo CPU processes trains as one
process does, saves the full weights, and resumes from its own checkpoints."""

from __future__ import annotations

import json

import pytest
from train_helpers import (
    TWO_CPU_PROCESSES,
    assert_runs_match,
    assert_same_trained_model,
    cli_error,
    config,
    read_log,
    read_steps,
    record_steps,
    run_cli,
    run_recorded,
    train_argv,
    unet_weights,
)

from fdiv_kernels.train.loop import TrainConfig, train


def test_two_sharded_processes_match_one_process_save_full_weights_and_resume(assets, tmp_path, monkeypatch):
    # Two micro-steps per step: the optimizer steps on the gradients FSDP reduce-scattered and summed over both.
    common = train_argv(assets, None, "--learning-rate", "1e-3", "--gradient-accumulation-steps", "2", "--fsdp")
    two = run_recorded(
        [*common, "--checkpoint-every", "1", "--output", str(tmp_path / "two")],
        tmp_path,
        TWO_CPU_PROCESSES,
        tmp_path / "s2",
    )
    assert two.returncode == 0, two.stderr[-3000:]
    run_two = json.loads((tmp_path / "two" / "train_config.json").read_text())
    assert (run_two["num_processes"], run_two["distributed_backend"], run_two["fsdp"]) == (2, "gloo", True)
    steps_two = read_steps(tmp_path / "s2")
    # The processes held different shards of the gradients (DDP would have given both the same, whole).
    assert all(len(set(s["grad_sha256"])) == 2 for s in steps_two)

    # One process (plain, no --fsdp) over the same global batches: the same logged numbers within the bound that
    # beta/2 times the measured error differences gives, and the same trained model, loaded by one process from
    # the sharded run's unet/ (the full weights: every tensor of the pipeline's UNet, at its full shape).
    record_steps(tmp_path / "s1", monkeypatch.setattr)
    train(config(assets, tmp_path / "one", max_steps=2, gradient_accumulation_steps=2))
    assert_runs_match(tmp_path / "one", tmp_path / "two", read_steps(tmp_path / "s1"), steps_two)
    one_weights, two_weights = unet_weights(tmp_path / "one"), unet_weights(tmp_path / "two")
    assert {k: v.shape for k, v in two_weights.items()} == {k: v.shape for k, v in one_weights.items()}
    assert_same_trained_model(assets["pipeline"], assets["dataset"], tmp_path / "one", tmp_path / "two")

    # Resumed from the sharded run's step-1 checkpoint (full model and optimizer states, re-sharded on load), the
    # second step is the uninterrupted run's, bit for bit: same processes, same shards, same order.
    resumed = run_cli(
        [*common, "--resume", str(tmp_path / "two" / "checkpoint-1"), "--output", str(tmp_path / "resumed")],
        tmp_path,
        TWO_CPU_PROCESSES,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_log(tmp_path / "resumed") == read_log(tmp_path / "two")[1:]
    resumed_weights = unet_weights(tmp_path / "resumed")
    assert all(resumed_weights[k].equal(two_weights[k]) for k in two_weights)


def test_fsdp_refusals(assets, tmp_path, capsys):
    with pytest.raises(ValueError, match="--fsdp does not run with --lora-rank"):
        TrainConfig(pipeline=tmp_path, dataset=tmp_path, output=tmp_path, fsdp=True, lora_rank=4)
    with pytest.raises(ValueError, match="--fsdp does not run with --mixed-precision"):
        TrainConfig(pipeline=tmp_path, dataset=tmp_path, output=tmp_path, fsdp=True, mixed_precision="bf16")
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from fdiv_kernels.train.fsdp import check_fsdp_launch

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):  # launches that need GPUs: checked directly
        with pytest.raises(ValueError, match=f"this launch is Accelerate's {kind.value}: launch with a plain"):
            check_fsdp_launch(SimpleNamespace(num_processes=2, distributed_type=kind))
    err = cli_error(train_argv(assets, tmp_path / "run", "--fsdp"), capsys)
    assert "--fsdp shards the model over processes and this run has one" in err
    assert not (tmp_path / "run").exists()
