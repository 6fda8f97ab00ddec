"""fused_fdpo_loss as a drop-in for the loss block of diffusers' Diffusion-DPO training loop.

The loop below is the shape of diffusers' `train_diffusion_dpo_sdxl.py` (winner and loser images side by side in
a batch, split into [w; l] latents, shared noise and timesteps per pair, a frozen reference UNet), with a tiny
UNet2DConditionModel built here and random latents and text embeddings standing in for the VAE, the text encoder
and the dataset, so that it runs anywhere in seconds. The script's ~15 lines of loss (two MSEs, chunk(2), the
inside term, -logsigmoid, implicit accuracy) become one call; `trainer_logs` gives the script's log names.

    python examples/diffusers_dropin.py                # 20 steps, Jensen-Shannon
    python examples/diffusers_dropin.py --quick        # 2 steps (CI)

Needs diffusers (pip install "fdiv_kernels[train]").
"""

from __future__ import annotations

import argparse
import copy

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from fdiv_kernels import fused_fdpo_loss
from fdiv_kernels.integrations import trainer_logs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--divergence", default="js", help="reverse_kl (exactly the script's loss), js, forward_kl, ...")
    ap.add_argument("--beta-dpo", type=float, default=5000.0, help="the script's --beta_dpo")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=4, help="train_batch_size: preference pairs per step")
    ap.add_argument("--quick", action="store_true", help="2 steps (CI)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    # A tiny SD-style UNet (4 latent channels, cross-attention to text embeddings) and its frozen reference.
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).to(device)
    ref_unet = copy.deepcopy(unet).requires_grad_(False).eval()
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    unet.train()

    for step in range(args.steps):
        # --- what the dataloader + VAE + text encoder give the script (random stand-ins here) -----------------
        pixel_latents = torch.randn(args.pairs, 2 * 4, 16, 16, device=device)  # winner and loser channel-stacked
        encoder_hidden_states = torch.randn(args.pairs, 7, 32, device=device).repeat(2, 1, 1)
        # --- the script, unchanged -----------------------------------------------------------------------------
        latents = torch.cat(pixel_latents.chunk(2, dim=1))  # [2B, 4, h, w]: winners then losers
        noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
        bsz = latents.shape[0] // 2
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=device).repeat(2)
        noisy_model_input = noise_scheduler.add_noise(latents, noise, timesteps)
        model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states).sample
        target = noise
        with torch.no_grad():
            ref_preds = ref_unet(noisy_model_input, timesteps, encoder_hidden_states).sample
        # --- the loss block: was model_losses/ref_losses/chunk(2)/inside_term/-logsigmoid/implicit_acc ------------
        loss, stats = fused_fdpo_loss(
            model_pred, ref_preds, target, beta=args.beta_dpo, divergence=args.divergence, return_stats=True
        )
        logs = trainer_logs(loss, stats)  # loss, raw_model_loss, ref_loss, implicit_acc
        # --- the script, unchanged -----------------------------------------------------------------------------
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step}: " + "  ".join(f"{k} {float(v):.4f}" for k, v in logs.items()), flush=True)
    print("done")


if __name__ == "__main__":
    main()
