"""The drop-in under Accelerate's real mixed precision: the tensors the scripts really hand to the loss.

Each test builds a tiny diffusers ``UNet2DConditionModel`` the way a trainer does (LoRA on a ``weight_dtype``
UNet for diffusers' SD1.5 and SDXL scripts, whose reference is the same prepared UNet with its adapters off; a
float32 UNet prepared by Accelerate plus a frozen ``ref_unet`` in ``weight_dtype``, not prepared (as the original
Diffusion-DPO ``train.py``) or prepared, for the original code), runs the forward passes as those scripts do, and
then runs the replacement snippet of ``docs/dropin.md`` *verbatim* (read from the file and executed) on whatever
came out. The dtypes are probed, not assumed: whatever combination Accelerate produces is what the loss gets, and
the loss, its gradient (into ``model_pred`` and through ``accelerator.backward`` into the trainable weights) and
the logged statistics are compared with the script's own formula evaluated in float64 on the same tensors.
"""

from __future__ import annotations

import os
import re
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from harness import assert_grad_rows_close

from fdiv_kernels import fused_fdpo_loss
from fdiv_kernels.integrations import trainer_conventions, trainer_logs

diffusers = pytest.importorskip("diffusers")
accelerate = pytest.importorskip("accelerate")
peft = pytest.importorskip("peft")

from test_trainer_parity import (  # noqa: E402 (after the importorskips)  the trainers' formulas, in float64
    F64,
    _assert_stats_match,
    diffusers_sd15_loss,
    diffusers_sdxl_loss,
    flow_sum_loss,
    original_diffusion_dpo_loss,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "dropin.md"
MIXED_PRECISION = ["no", "bf16", "fp16"]
PREDICTION_TYPES = ["epsilon", "v_prediction"]  # v-prediction: winner and loser have distinct targets
NUM_PAIRS = 3


def weight_dtype_of(accelerator):
    """The scripts' own rule (their code, verbatim in substance): non-trainable weights in the mixed dtype."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def doc_snippet(heading: str, call: str = "fused_fdpo_loss(") -> str:
    """The code block of a ``## `` section of docs/dropin.md that makes ``call`` (its replacement code)."""
    text = DOC.read_text()
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end >= 0 else None]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S) if call in b]
    assert len(blocks) == 1, f"docs/dropin.md, section {heading!r}: expected one block calling {call}"
    return textwrap.dedent(blocks[0])


def run_snippet(heading: str, namespace: dict, call: str = "fused_fdpo_loss(") -> dict:
    namespace = dict(namespace, torch=torch, F=F, fused_fdpo_loss=fused_fdpo_loss)
    exec(compile(doc_snippet(heading, call), f"docs/dropin.md ({heading})", "exec"), namespace)  # noqa: S102
    return namespace


@pytest.fixture
def make_accelerator():
    """A fresh Accelerator per test (its state is a process-wide singleton), one thread (tiny ops)."""
    from accelerate.state import AcceleratorState

    env, threads = dict(os.environ), torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    made = []

    def make(mixed_precision, cpu=False):
        try:
            accelerator = accelerate.Accelerator(mixed_precision=mixed_precision, cpu=cpu)
        except (ValueError, RuntimeError, NotImplementedError) as err:  # probed: say why, never assume
            pytest.skip(f"Accelerate refuses mixed_precision={mixed_precision!r} here: {err}")
        made.append(accelerator)
        return accelerator

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(threads)


# ---- tiny models and a batch built as the scripts build it --------------------------------------------------


def tiny_unet(sdxl=False):
    torch.manual_seed(0)
    extra = (
        dict(
            addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4
        )
        if sdxl
        else {}
    )
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
        **extra,
    )


def lora_unet(accelerator, weight_dtype, sdxl=False):
    """diffusers' DPO scripts: frozen UNet in weight_dtype, LoRA on the attention projections, LoRA upcast to
    float32 under fp16, then accelerator.prepare. LoRA B starts at 0 (policy == reference): move it a little."""
    unet = tiny_unet(sdxl).requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    unet.add_adapter(
        peft.LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
        )
    )
    if accelerator.mixed_precision == "fp16":
        for param in unet.parameters():
            if param.requires_grad:
                param.data = param.to(torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=g))
    return accelerator.prepare(unet)


def script_batch(accelerator, weight_dtype, prediction_type, sdxl=False, seed=0, latents_dtype=None):
    """Latents as the VAE returns them (weight_dtype; ``latents_dtype`` for the SDXL script's float32 VAE given
    by --pretrained_vae_model_name_or_path, whose latents it does not cast), noise =
    randn_like(latents).chunk(2)[0].repeat(2, ...), timesteps shared by a pair, target = noise (epsilon) or the
    velocity (distinct for winner and loser)."""
    g = torch.Generator().manual_seed(seed)
    dev = accelerator.device

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dev, weight_dtype)

    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    latents = randn(2 * NUM_PAIRS, 4, 8, 8).to(latents_dtype or weight_dtype)
    noise = randn(*latents.shape).to(latents.dtype).chunk(2)[0].repeat(2, 1, 1, 1)  # randn_like(latents)
    timesteps = torch.randint(0, 1000, (NUM_PAIRS,), generator=g).to(dev).repeat(2)
    noisy_model_input = scheduler.add_noise(latents, noise, timesteps)
    if prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)
    ns = dict(
        noise_scheduler=scheduler,
        latents=latents,
        noise=noise,
        timesteps=timesteps,
        target=target,
        noisy_model_input=noisy_model_input,
        encoder_hidden_states=randn(NUM_PAIRS, 6, 8).repeat(2, 1, 1),
    )
    if sdxl:
        ns.update(
            prompt_embeds=ns["encoder_hidden_states"],
            pooled_prompt_embeds=randn(NUM_PAIRS, 8).repeat(2, 1),
            add_time_ids=torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]]).to(dev, weight_dtype).repeat(2 * NUM_PAIRS, 1),
        )
    return ns


def pick_beta(formula, model_pred, ref_pred, target):
    """A beta_dpo that puts the largest |logit| near 3 (a real preference signal, not saturated)."""
    logits = formula(model_pred.detach(), ref_pred, target, 1.0)["logits"]
    scale = logits.abs().max().item()
    assert scale > 0, "policy == reference: the test would only see ties"
    return float(f"{3.0 / scale:.2g}")


# ---- the check, shared by every trainer -----------------------------------------------------------------------


def trainable(unet):
    return [(n, p) for n, p in unet.named_parameters() if p.requires_grad]


def check_against_formula(accelerator, unet, ns, formula, probes):
    """The snippet's loss, stats and gradients against ``formula`` (float64) on the very tensors it was given."""
    model_pred, ref_pred, target, beta = ns["model_pred"], ns["ref_pred"], ns["target"], ns["beta"]
    loss, stats = ns["loss"], ns["stats"]
    # The dtypes the scripts hand over: probed, recorded, and each one must be a dtype the run can produce.
    probes.update(model_pred=model_pred.dtype, ref_pred=ref_pred.dtype, target=target.dtype)
    weight_dtype = weight_dtype_of(accelerator)
    for name, dtype in probes.items():
        assert dtype in (torch.float32, weight_dtype), (name, dtype)

    expected = formula(model_pred.detach(), ref_pred, target, beta)
    assert expected["logits"].abs().max().item() > 0.5  # pick_beta worked: a real signal
    _assert_stats_match(loss, stats, expected, NUM_PAIRS)
    logs = trainer_logs(loss, stats)
    assert logs["loss"].item() == pytest.approx(expected["loss"].item(), rel=2e-6, abs=1e-7)

    # Gradient into model_pred: in model_pred's dtype, equal to the float64 formula's up to that dtype's rounding.
    (grad,) = torch.autograd.grad(loss, model_pred, retain_graph=True)
    leaf = model_pred.detach().to(F64).requires_grad_(True)
    (expected_grad,) = torch.autograd.grad(formula(leaf, ref_pred, target, beta)["loss"], leaf)
    assert grad.dtype == model_pred.dtype
    assert_grad_rows_close(grad, expected_grad)  # each row against its own scale

    # Through the UNet as the scripts do it (accelerator.backward): the same weight gradients as the formula's.
    accelerator.backward(loss, retain_graph=True)
    fused_grads = {n: p.grad.detach().clone() for n, p in trainable(unet)}
    unet.zero_grad(set_to_none=True)
    accelerator.backward(formula(model_pred, ref_pred, target, beta)["loss"])
    norm = sum(p.grad.double().norm() ** 2 for _, p in trainable(unet)).sqrt().item()
    assert norm > 0
    diff = sum((fused_grads[n].double() - p.grad.double()).norm() ** 2 for n, p in trainable(unet)).sqrt().item()
    # float32 end to end: rounding only; a 16-bit model_pred or weights: the incoming gradient itself is rounded
    # to 16 bits on each side, then propagated through 16-bit arithmetic.
    all_fp32 = model_pred.dtype == torch.float32 and all(p.dtype == torch.float32 for _, p in trainable(unet))
    weight_rtol = 1e-4 if all_fp32 else 2e-2
    assert diff <= weight_rtol * norm, (diff, norm)
    unet.zero_grad(set_to_none=True)
    return expected


def check_each_target_counts(ns, formula, kwargs):
    """Distinct winner/loser targets: replacing either half changes the loss, and the fused loss follows."""
    model_pred, ref_pred, target = ns["model_pred"].detach(), ns["ref_pred"], ns["target"]
    if ns["noise_scheduler"].config.prediction_type == "epsilon":
        assert torch.equal(target[:NUM_PAIRS], target[NUM_PAIRS:])  # the scripts' shared noise
        return
    assert not torch.equal(target[:NUM_PAIRS], target[NUM_PAIRS:])
    base = formula(model_pred, ref_pred, target, ns["beta"])["loss"].item()
    for half in (slice(0, NUM_PAIRS), slice(NUM_PAIRS, 2 * NUM_PAIRS)):
        other = target.clone()
        other[half] = target.roll(NUM_PAIRS, 0)[half]  # each sample gets its partner's target
        moved = formula(model_pred, ref_pred, other, ns["beta"])["loss"].item()
        assert abs(moved - base) > 1e-3 * abs(base) + 1e-5, "this half of the target does not change the loss"
        fused = fused_fdpo_loss(model_pred, ref_pred, other, **kwargs).item()
        assert fused == pytest.approx(moved, rel=2e-6, abs=1e-7)


# ---- diffusers' SD1.5 and SDXL scripts (LoRA; reference = same UNet, adapters off) -----------------------------


def run_diffusers_script(accelerator, sdxl, prediction_type, latents_dtype=None):
    weight_dtype = weight_dtype_of(accelerator)
    unet = lora_unet(accelerator, weight_dtype, sdxl=sdxl)
    ns = script_batch(accelerator, weight_dtype, prediction_type, sdxl=sdxl, latents_dtype=latents_dtype)
    unet.train()
    try:
        if sdxl:
            added = {"time_ids": ns["add_time_ids"], "text_embeds": ns["pooled_prompt_embeds"]}
            model_pred = unet(
                ns["noisy_model_input"], ns["timesteps"], ns["prompt_embeds"], added_cond_kwargs=added
            ).sample
        else:
            model_pred = unet(ns["noisy_model_input"], ns["timesteps"], ns["encoder_hidden_states"]).sample
    except RuntimeError as err:
        if accelerator.native_amp or ns["noisy_model_input"].dtype == weight_dtype:
            raise
        pytest.skip(
            f"the script cannot run with {ns['noisy_model_input'].dtype} latents under mixed_precision="
            f"{accelerator.mixed_precision!r} on {accelerator.device}: Accelerate does not autocast there "
            f"(native_amp=False), and they meet the {weight_dtype} UNet: {err}"
        )
    return unet, dict(ns, accelerator=accelerator, unet=unet, model_pred=model_pred)


DIFFUSERS_CASES = [
    (script, mp, pt)
    for script in ("sd15", "sdxl")
    for mp in MIXED_PRECISION
    for pt in PREDICTION_TYPES
    if mp != "no" or pt == "v_prediction"
]  # all-float32: one case each
DIFFUSERS_CASES += [("sdxl_fp32_vae", mp, "epsilon") for mp in ("bf16", "fp16")]


@pytest.mark.parametrize(
    "script, mixed_precision, prediction_type", DIFFUSERS_CASES, ids=["-".join(c) for c in DIFFUSERS_CASES]
)
def test_diffusers_scripts_under_accelerate(make_accelerator, script, mixed_precision, prediction_type):
    """``sdxl_fp32_vae``: the SDXL script given --pretrained_vae_model_name_or_path keeps float32 latents."""
    accelerator = make_accelerator(mixed_precision)
    sdxl = script.startswith("sdxl")
    latents_dtype = torch.float32 if script == "sdxl_fp32_vae" else None
    unet, ns = run_diffusers_script(accelerator, sdxl, prediction_type, latents_dtype=latents_dtype)
    formula = diffusers_sdxl_loss if sdxl else diffusers_sd15_loss
    # The reference forward, once outside the snippet, to choose a beta for these tensors.
    accelerator.unwrap_model(unet).disable_adapters()
    with torch.no_grad():
        if sdxl:
            added = {"time_ids": ns["add_time_ids"], "text_embeds": ns["pooled_prompt_embeds"]}
            probe_ref = unet(
                ns["noisy_model_input"], ns["timesteps"], ns["prompt_embeds"], added_cond_kwargs=added
            ).sample
        else:
            probe_ref = unet(ns["noisy_model_input"], ns["timesteps"], ns["encoder_hidden_states"]).sample
    accelerator.unwrap_model(unet).enable_adapters()
    beta = pick_beta(formula, ns["model_pred"], probe_ref, ns["target"])
    args = types.SimpleNamespace(beta_dpo=beta, divergence="reverse_kl", loss_type="sigmoid", ipo_tau=None)

    heading = "Drop into `train_diffusion_dpo_sdxl.py`" if sdxl else "Drop into `train_diffusion_dpo.py`"
    out = run_snippet(heading, dict(ns, args=args))
    torch.testing.assert_close(out["ref_preds"], probe_ref, rtol=0, atol=0)  # adapters really were off
    ns.update(ref_pred=out["ref_preds"], loss=out["loss"], stats=out["stats"], beta=beta)
    # The snippet logs the statistic the kernel computed (the same storage), not a recomputation.
    assert out["implicit_acc"].data_ptr() == out["stats"].implicit_acc.data_ptr()
    assert torch.equal(out["implicit_acc"], out["stats"].implicit_acc)
    probes = {}
    check_against_formula(accelerator, unet, ns, formula, probes)
    kwargs = dict(beta=beta, **trainer_conventions("diffusers_sdxl" if sdxl else "diffusers_sd15"))
    check_each_target_counts(ns, formula, kwargs)
    # What Accelerate gives today (probed above, printed for the docs): the prepared UNet's output is float32
    # whenever it autocasts (convert_outputs_to_fp32), else the weight dtype; the target is in weight_dtype.
    expected_out = torch.float32 if accelerator.native_amp else weight_dtype_of(accelerator)
    assert probes["model_pred"] == probes["ref_pred"] == expected_out, probes
    assert probes["target"] == (latents_dtype or weight_dtype_of(accelerator)), probes
    print(f"\n[dtypes] {script} {mixed_precision} {prediction_type} on {accelerator.device}: {probes}")


def sd15_script_formula(loss_type, tau):
    """diffusers' SD1.5 script for --loss_type hinge / ipo (its ipo reads args.beta, never defined: tau here)."""

    def formula(model_pred, ref_pred, target, beta_dpo):
        out = diffusers_sd15_loss(model_pred, ref_pred, target, beta_dpo)
        logits = out["logits"] / beta_dpo  # ref_diff - model_diff
        if loss_type == "hinge":
            out["loss"] = torch.relu(1 - beta_dpo * logits).mean()
        else:
            out["loss"] = ((logits - 1 / (2 * tau)) ** 2).mean()
            out["logits"] = logits  # fdiv_kernels' z with beta=1
        return out

    return formula


@pytest.mark.parametrize("loss_type", ["hinge", "ipo"])
def test_sd15_loss_types_under_accelerate(make_accelerator, loss_type):
    """--loss_type hinge and ipo through the documented snippet, bf16 mixed precision, distinct targets."""
    accelerator = make_accelerator("bf16")
    unet, ns = run_diffusers_script(accelerator, False, "v_prediction")
    accelerator.unwrap_model(unet).disable_adapters()
    with torch.no_grad():
        probe_ref = unet(ns["noisy_model_input"], ns["timesteps"], ns["encoder_hidden_states"]).sample
    accelerator.unwrap_model(unet).enable_adapters()
    beta = pick_beta(diffusers_sd15_loss, ns["model_pred"], probe_ref, ns["target"]) / 4  # |z| < 1: hinge active
    raw = diffusers_sd15_loss(ns["model_pred"].detach(), probe_ref, ns["target"], 1.0)["logits"]
    tau = float(f"{1 / (2 * raw.abs().max().item()):.2g}")  # the ipo margin 1/(2 tau) on the logits' scale
    args = types.SimpleNamespace(beta_dpo=beta, divergence="reverse_kl", loss_type=loss_type, ipo_tau=tau)
    out = run_snippet("Drop into `train_diffusion_dpo.py`", dict(ns, args=args))
    formula = sd15_script_formula(loss_type, tau)
    formula_beta = beta if loss_type == "hinge" else 1.0
    ns.update(ref_pred=out["ref_preds"], loss=out["loss"], stats=out["stats"], beta=beta)
    # the formula ignores beta for ipo; its logits are then the unscaled ones, as fdiv_kernels' z with beta=1
    expected = formula(ns["model_pred"].detach(), ns["ref_pred"], ns["target"], beta)
    if loss_type == "hinge":
        assert (expected["logits"] < 1).any() and expected["loss"].item() > 0  # the hinge is active somewhere
    torch.testing.assert_close(out["loss"].double(), expected["loss"], rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(out["stats"].logits.double(), expected["logits"], rtol=1e-5, atol=1e-7)
    (grad,) = torch.autograd.grad(out["loss"], ns["model_pred"], retain_graph=True)
    leaf = ns["model_pred"].detach().to(F64).requires_grad_(True)
    (expected_grad,) = torch.autograd.grad(formula(leaf, ns["ref_pred"], ns["target"], beta)["loss"], leaf)
    scale = expected_grad.abs().amax(dim=(1, 2, 3), keepdim=True)
    assert (scale > 0).all()
    torch.testing.assert_close(grad.double() / scale, expected_grad / scale, rtol=0, atol=2e-5)
    kwargs = dict(
        beta=formula_beta,
        beta_convention="full",
        loss_type=loss_type,
        **({"ipo_tau": tau} if loss_type == "ipo" else {}),
    )
    check_each_target_counts(dict(ns, beta=beta), formula, kwargs)


# ---- the original Diffusion-DPO train.py (full fine-tune; frozen ref_unet) -------------------------------------


def run_original_script(accelerator, prediction_type, ref_prepared):
    """train.py: the trained UNet stays float32 and is prepared; ``ref_unet.to(device, dtype=weight_dtype)`` is
    not (``ref_prepared`` also prepares it, as a trainer might)."""
    weight_dtype = weight_dtype_of(accelerator)
    ref_unet = tiny_unet().requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    unet = tiny_unet()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a policy a little way into fine-tuning
        for p in unet.parameters():
            p.add_(0.01 * p.abs().mean() * torch.randn(p.shape, generator=g))
    unet = accelerator.prepare(unet.to(accelerator.device))
    if ref_prepared:
        ref_unet = accelerator.prepare(ref_unet)
    ns = script_batch(accelerator, weight_dtype, prediction_type)
    unet.train()
    model_batch_args = (ns["noisy_model_input"], ns["timesteps"], ns["encoder_hidden_states"])
    try:
        model_pred = unet(*model_batch_args, added_cond_kwargs=None).sample
    except RuntimeError as err:
        if accelerator.native_amp or "dtype" not in str(err):
            raise
        pytest.skip(
            f"train.py's float32 UNet cannot run under mixed_precision={accelerator.mixed_precision!r} "
            f"on {accelerator.device}: Accelerate does not autocast there (native_amp=False), and the "
            f"{weight_dtype} inputs meet float32 weights: {err}"
        )
    return unet, dict(
        ns, ref_unet=ref_unet, model_batch_args=model_batch_args, added_cond_kwargs=None, model_pred=model_pred
    )


@pytest.mark.parametrize(
    "prediction_type, ref_prepared",
    [("epsilon", False), ("epsilon", True), ("v_prediction", False)],
    ids=["epsilon-ref_unprepared", "epsilon-ref_prepared", "v_prediction-ref_unprepared"],
)
@pytest.mark.parametrize("mixed_precision", MIXED_PRECISION)
def test_original_code_under_accelerate(make_accelerator, mixed_precision, prediction_type, ref_prepared):
    accelerator = make_accelerator(mixed_precision)
    unet, ns = run_original_script(accelerator, prediction_type, ref_prepared)
    with torch.no_grad():
        probe_ref = ns["ref_unet"](*ns["model_batch_args"]).sample
    beta = pick_beta(original_diffusion_dpo_loss, ns["model_pred"], probe_ref, ns["target"])
    args = types.SimpleNamespace(beta_dpo=beta, divergence="reverse_kl")
    out = run_snippet("Drop into the original Diffusion-DPO `train.py`", dict(ns, args=args))
    ns.update(ref_pred=out["ref_pred"], loss=out["loss"], stats=out["stats"], beta=beta)
    probes = {}
    check_against_formula(accelerator, unet, ns, original_diffusion_dpo_loss, probes)
    check_each_target_counts(ns, original_diffusion_dpo_loss, dict(beta=beta, **trainer_conventions("diffusion_dpo")))
    weight_dtype = weight_dtype_of(accelerator)
    expected_model = torch.float32  # prepared float32 UNet: autocast + convert_outputs_to_fp32, or plain fp32
    expected_ref = torch.float32 if ref_prepared and accelerator.native_amp else weight_dtype
    assert (probes["model_pred"], probes["ref_pred"], probes["target"]) == (
        expected_model,
        expected_ref,
        weight_dtype,
    ), probes
    print(
        f"\n[dtypes] original {mixed_precision} {prediction_type} ref_prepared={ref_prepared} on "
        f"{accelerator.device}: {probes}"
    )


# ---- the other snippets (flow trainer, auto beta, separate tensors) on the same real tensors ---------------------


@pytest.mark.parametrize("mixed_precision", MIXED_PRECISION)
@pytest.mark.parametrize("source", ["lora", "original"])
def test_other_snippets_under_accelerate(make_accelerator, source, mixed_precision):
    """The flow-matching, auto-beta and separate-tensors snippets, verbatim, on the v-prediction tensors (distinct
    targets) of a LoRA UNet or of train.py's UNet pair (float32 policy, bf16 reference) under Accelerate."""
    accelerator = make_accelerator(mixed_precision)
    if source == "lora":
        unet, ns = run_diffusers_script(accelerator, False, "v_prediction")
        accelerator.unwrap_model(unet).disable_adapters()
        with torch.no_grad():
            ref_pred = unet(ns["noisy_model_input"], ns["timesteps"], ns["encoder_hidden_states"]).sample
        accelerator.unwrap_model(unet).enable_adapters()
    else:
        unet, ns = run_original_script(accelerator, "v_prediction", ref_prepared=False)
        with torch.no_grad():
            ref_pred = ns["ref_unet"](*ns["model_batch_args"]).sample
    model_pred, target = ns["model_pred"], ns["target"]
    print(f"\n[dtypes] {source} {mixed_precision}: {model_pred.dtype}, {ref_pred.dtype}, {target.dtype}")

    # Flow-matching trainer: summed errors, 0.5 * beta.
    beta = pick_beta(flow_sum_loss, model_pred, ref_pred, target)
    out = run_snippet(
        "Drop into a flow-matching trainer",
        dict(model_pred=model_pred, ref_pred=ref_pred, target=target, beta=beta, divergence="reverse_kl"),
    )
    expected = flow_sum_loss(model_pred.detach(), ref_pred, target, beta)
    assert expected["logits"].abs().max().item() > 0.5
    _assert_stats_match(out["loss"], out["stats"], expected, NUM_PAIRS)
    (grad,) = torch.autograd.grad(out["loss"], model_pred, retain_graph=True)
    leaf = model_pred.detach().to(F64).requires_grad_(True)
    (expected_grad,) = torch.autograd.grad(flow_sum_loss(leaf, ref_pred, target, beta)["loss"], leaf)
    assert_grad_rows_close(grad, expected_grad)

    # Auto beta: the SDXL/original formula with beta = the snippet's tensor.
    out = run_snippet("Auto beta", dict(model_pred=model_pred, ref_pred=ref_pred, target=target))
    auto_beta = out["auto_beta"]
    assert auto_beta.dim() == 0 and not auto_beta.requires_grad
    expected = diffusers_sdxl_loss(model_pred.detach(), ref_pred, target, auto_beta.to(F64))
    assert expected["logits"].abs().mean().item() == pytest.approx(1.0, rel=1e-3)  # the example rule's intent
    _assert_stats_match(out["loss"], out["stats"], expected, NUM_PAIRS)

    # Separate winner and loser tensors: the same numbers as the [2B] call.
    halves = [t.chunk(2) for t in (model_pred, ref_pred, target)]
    (model_w, model_l), (ref_w, ref_l), (target_w, target_l) = halves
    from fdiv_kernels.integrations import fdpo_loss_from_pairs

    out = run_snippet(
        "Separate winner and loser tensors",
        dict(
            model_w=model_w,
            model_l=model_l,
            ref_w=ref_w,
            ref_l=ref_l,
            target_w=target_w,
            target_l=target_l,
            beta=beta,
            fdpo_loss_from_pairs=fdpo_loss_from_pairs,
        ),
        call="fdpo_loss_from_pairs(",
    )
    direct, direct_stats = fused_fdpo_loss(model_pred, ref_pred, target, beta=beta, divergence="js", return_stats=True)
    torch.testing.assert_close(out["loss"], direct, rtol=1e-6, atol=0)
    torch.testing.assert_close(out["stats"].logits, direct_stats.logits, rtol=1e-6, atol=1e-7)


# ---- the original code's own bf16 arithmetic, measured (docs/dropin.md, "Mixed precision") --------------------


def original_script_as_written(model_pred, ref_pred, target, beta_dpo):
    """train.py's loss lines verbatim: no .float(), so under bf16 the reference errors are computed in bf16."""
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    return dict(logits=inside_term, ref_err=ref_losses, loss=-1 * F.logsigmoid(inside_term).mean())


def test_original_bf16_arithmetic_quantizes_its_logits(make_accelerator):
    """The numbers quoted in docs/dropin.md ("Mixed precision"): run with ``-s`` to print them (on the CPU, so
    a GPU machine measures the same tensors)."""
    accelerator = make_accelerator("bf16", cpu=True)
    _, ns = run_original_script(accelerator, "epsilon", ref_prepared=False)
    model_pred, target = ns["model_pred"].detach(), ns["target"]
    with torch.no_grad():
        ref_pred = ns["ref_unet"](*ns["model_batch_args"]).sample
    assert (model_pred.dtype, ref_pred.dtype, target.dtype) == (torch.float32, torch.bfloat16, torch.bfloat16)
    beta = pick_beta(original_diffusion_dpo_loss, model_pred, ref_pred, target)
    exact = original_diffusion_dpo_loss(model_pred, ref_pred, target, beta)
    script = original_script_as_written(model_pred, ref_pred, target, beta)
    fused_loss, stats = fused_fdpo_loss(
        model_pred, ref_pred, target, beta=beta, return_stats=True, **trainer_conventions("diffusion_dpo")
    )
    assert script["ref_err"].dtype == torch.bfloat16 and script["logits"].dtype == torch.float32
    e_ref_err = (script["ref_err"].double() - exact["ref_err"]).abs().max().item()
    script_err = (script["logits"].double() - exact["logits"]).abs().max().item()
    fused_err = (stats.logits.double() - exact["logits"]).abs().max().item()
    step = 0.5 * beta * torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(exact["ref_err"])).max().item()
    loss_gap = abs(script["loss"].item() - exact["loss"].item())
    print(
        f"\n[bf16 original] B={NUM_PAIRS} beta_dpo={beta:g} e_ref in [{exact['ref_err'].min():.4f}, "
        f"{exact['ref_err'].max():.4f}], |logits| <= {exact['logits'].abs().max():.3f}; bf16 e_ref off by up to "
        f"{e_ref_err:.3g}; one bf16 step of e_ref moves the logit by {step:.3g}; logits off by up to: script "
        f"{script_err:.3g}, fused {fused_err:.3g}; loss: float64 {exact['loss'].item():.6f}, script "
        f"{script['loss'].item():.6f}, fused {fused_loss.item():.6f}"
    )
    # The script's reference errors are its float64 values rounded to bf16 (half an ulp at most, not zero) ...
    assert 0 < e_ref_err <= torch.finfo(torch.bfloat16).eps / 2 * exact["ref_err"].max().item() * 1.01
    # ... which moves its logits by a sizeable fraction of their range; the fused logits are the formula's.
    assert script_err > 0.01 * exact["logits"].abs().max().item()
    assert fused_err < 1e-5 * exact["logits"].abs().max().item()
    assert script_err > 1000 * fused_err
    assert loss_gap > 1e-4
