"""Timestep sampling and timestep weighting of a training step, as diffusers' training scripts offer them.

- Flow-matching targets (``--weighting-scheme``, diffusers' SD3 scripts): ``logit_normal`` and ``mode`` draw the
  timestep from that density (``compute_density_for_timestep_sampling``); ``sigma_sqrt`` and ``cosmap`` draw it
  uniformly and weight it (``compute_loss_weighting_for_sd3``); ``none`` is uniform and unweighted.
- Epsilon / v-prediction targets (``--snr-gamma``, Min-SNR, Hang et al. 2023, as diffusers' text-to-image
  script): weight ``min(SNR, gamma) / SNR`` (epsilon) or ``min(SNR, gamma) / (SNR + 1)`` (v-prediction).

Winner and loser share the timestep, so a weight is per pair; it goes to ``fused_fdpo_loss(pair_weight=...)``,
which scales the pair's log-ratio ``d = beta/2 * w * (e_ref - e)`` as the weight scales each error in the
weighted-MSE form of Diffusion-DPO.
"""

from __future__ import annotations

import torch

from .model import NoiseProcess

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
_DENSITIES = ("logit_normal", "mode")


def check_timestep_flags(weighting_scheme: str, snr_gamma: float | None, logit_std: float) -> None:
    """Flag-level checks (the target is known only once the pipeline is read: see :meth:`TimestepSampler`)."""
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"--weighting-scheme {weighting_scheme!r}: expected one of {list(WEIGHTING_SCHEMES)}")
    if snr_gamma is not None and not snr_gamma > 0:
        raise ValueError(f"--snr-gamma must be > 0; got {snr_gamma!r}")
    if not logit_std > 0:
        raise ValueError(f"--logit-std must be > 0; got {logit_std!r}")


class TimestepSampler:
    """Draws a pair's timestep index from its generator, and gives the per-pair weights of drawn indices."""

    def __init__(
        self,
        process: NoiseProcess,
        weighting_scheme: str = "none",
        snr_gamma: float | None = None,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ):
        check_timestep_flags(weighting_scheme, snr_gamma, logit_std)
        flow = process.prediction_type == "flow"
        if weighting_scheme != "none" and not flow:
            raise ValueError(
                f"--weighting-scheme {weighting_scheme} is for flow-matching targets; this run's target is "
                f"{process.prediction_type} (use --snr-gamma for Min-SNR weighting)"
            )
        if snr_gamma is not None and flow:
            raise ValueError(
                "--snr-gamma (Min-SNR) needs an epsilon or v_prediction target; this run's target is "
                "flow (use --weighting-scheme)"
            )
        self.process, self.scheme, self.snr_gamma = process, weighting_scheme, snr_gamma
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale

    def describe(self) -> str:
        """What the drawn timesteps depend on (cached reference errors must match it)."""
        if self.scheme in _DENSITIES:
            return f"{self.scheme}(mean={self.logit_mean}, std={self.logit_std}, mode_scale={self.mode_scale})"
        return "uniform"

    def index(self, generator: torch.Generator) -> torch.Tensor:
        """One timestep index in ``[0, num_timesteps)``, shape ``[1]``."""
        n = self.process.num_timesteps
        if self.scheme not in _DENSITIES:
            return torch.randint(n, (1,), generator=generator)
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            self.scheme, 1, self.logit_mean, self.logit_std, self.mode_scale, generator=generator
        )
        return (u * n).long().clamp_(0, n - 1)  # as diffusers' scripts; the clamp guards u == 1 in float32

    def pair_weight(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-pair weights ``[B]`` for the model timesteps ``[B]`` that ``NoiseProcess.prepare`` gave, or None."""
        if self.scheme in ("cosmap", "sigma_sqrt"):
            from diffusers.training_utils import compute_loss_weighting_for_sd3

            # The flow-matching scheduler's timesteps are its sigmas times num_train_timesteps.
            sigmas = timesteps.float() / self.process.num_timesteps
            return compute_loss_weighting_for_sd3(self.scheme, sigmas).float()
        if self.snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.process.scheduler, timesteps)  # DDPM timesteps are the indices
            clipped = torch.clamp(snr, max=self.snr_gamma)
            return clipped / (snr + 1 if self.process.prediction_type == "v_prediction" else snr)
        return None
