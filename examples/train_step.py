"""The one-call f-DPO loss in a hand-written training step.

A toy denoiser and a frozen copy of it as the reference; each step takes a batch of preference pairs (winners then
losers, the layout diffusers' Diffusion-DPO scripts use), noises them, predicts the noise with both models and
makes the loss with one call. Runs on CPU or GPU:

    python examples/train_step.py                 # 50 steps, Jensen-Shannon
    python examples/train_step.py --divergence reverse_kl --steps 200
    python examples/train_step.py --quick         # 3 small steps (CI)
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
from torch import nn

from fdiv_kernels import fused_fdpo_loss


class TinyDenoiser(nn.Module):
    """eps-prediction network: noisy latents + timestep -> predicted noise."""

    def __init__(self, channels: int = 4, width: int = 32):
        super().__init__()
        self.t_embed = nn.Linear(1, width)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + self.t_embed(t.float()[:, None] / 1000)[:, :, None, None]
        h = self.mid(torch.nn.functional.silu(h))
        return self.out(torch.nn.functional.silu(h))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--divergence", default="js", help="reverse_kl, forward_kl, js, alpha, hellinger")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--pairs", type=int, default=8, help="preference pairs per batch (B)")
    ap.add_argument("--size", type=int, default=32, help="latent height and width")
    ap.add_argument("--quick", action="store_true", help="3 steps on 2 pairs of 8x8 latents")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.pairs, args.size = 3, 2, 8
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    policy = TinyDenoiser().to(device)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()  # the frozen reference model
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    alphas_cumprod = torch.cos(torch.linspace(0, 1, 1000, device=device) * math.pi / 2).clamp(min=1e-4) ** 2
    B, C, S = args.pairs, 4, args.size

    for step in range(args.steps):
        # Preference data: rows [w_0 .. w_{B-1}; l_0 .. l_{B-1}]. Here the "preferred" latents are smoother.
        winners = torch.nn.functional.avg_pool2d(torch.randn(B, C, S, S, device=device), 3, 1, 1) * 3
        losers = torch.randn(B, C, S, S, device=device)
        latents = torch.cat([winners, losers])
        # Both samples of a pair share the noise and the timestep, as in Diffusion-DPO.
        noise = torch.randn(B, C, S, S, device=device)
        t = torch.randint(0, 1000, (B,), device=device).repeat(2)
        a = alphas_cumprod[t][:, None, None, None]
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise.repeat(2, 1, 1, 1)

        model_pred = policy(noisy, t)
        with torch.no_grad():
            ref_pred = reference(noisy, t)
        # The whole loss: errors, log-ratios, f-divergence link, logsigmoid, mean; statistics for logging.
        loss, stats = fused_fdpo_loss(
            model_pred,
            ref_pred,
            noise,  # noise [B, ...]: the target shared by a pair
            beta=5000.0,
            divergence=args.divergence,
            return_stats=True,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(
                f"step {step:4d}  loss {loss.item():.4f}  implicit_acc {stats.implicit_acc.item():.2f}  "
                f"raw_model_loss {stats.raw_model_loss.item():.4f}",
                flush=True,
            )
    print("done")


if __name__ == "__main__":
    main()
