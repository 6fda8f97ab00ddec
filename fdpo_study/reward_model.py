"""A small learned reward model for the embedded task, so that the labeller of the fine-tuning pairs is not the judge.

Real preference pipelines label pairs with a model learned from human choices (PickScore, ImageReward), never with
the quantity they are finally judged by. Here the programmatic reward (``task.reward``) plays the human: it labels
a separate set of pairs (optionally with Bradley-Terry noise), a :class:`RewardModel` is fitted to those labels,
and the learned model labels the fine-tuning pairs. Evaluation keeps the programmatic reward as the gold standard,
so what the learned labeller gets wrong (and the policy then learns) shows up as lost reward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import task


class RewardModel(nn.Module):
    """score(image, caption): a small CNN over the image whose channels the caption scales and shifts (FiLM), so that
    it can check "this colour, at that place", then an MLP. The caption enters as the mean of its word embeddings:
    that loses nothing here, as every attribute word of the task's vocabulary is unique to its attribute."""

    def __init__(self, vocabulary: tuple[str, ...] = task.VOCABULARY, width: int = 32, channels: int = 32):
        super().__init__()
        self.vocabulary = {word: i for i, word in enumerate(vocabulary)}
        self.text = nn.EmbeddingBag(len(vocabulary), width, mode="mean")
        self.film = nn.Linear(width, 2 * channels)
        self.conv = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
        )
        self.head = nn.Sequential(
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(channels * 16, 64),
            nn.GELU(),
            nn.Linear(64, 1),
        )

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        try:
            return torch.tensor([[self.vocabulary[w] for w in caption.split()] for caption in captions])
        except KeyError as err:
            raise ValueError(f"the reward model knows the task's words only; got {err.args[0]!r}") from None

    def forward(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Scores [N] of images [N, 3, H, W] in [0, 1] for their captions."""
        scale, shift = self.film(self.text(self.token_ids(captions)))[:, :, None, None].chunk(2, 1)
        return self.head(self.conv(images * 2 - 1) * (1 + scale) + shift)[:, 0]


def fit(
    images_0: torch.Tensor,
    images_1: torch.Tensor,
    captions: list[str],
    label_0: torch.Tensor,
    seed: int,
    steps: int = 400,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
) -> RewardModel:
    """Fit a :class:`RewardModel` to labelled pairs by the Bradley-Terry likelihood: P(image 0 preferred) =
    sigmoid(score_0 - score_1); ``label_0`` in [0, 1] (0.5: a tie). Seeded: the same inputs give the same model."""
    if not len(images_0) == len(images_1) == len(captions) == len(label_0) > 0:
        raise ValueError("fit needs as many images_0, images_1, captions and labels, at least one")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RewardModel()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    label_0 = torch.as_tensor(label_0, dtype=torch.float32)
    for _ in range(steps):
        idx = torch.randint(len(captions), (min(batch_size, len(captions)),), generator=generator)
        batch = [captions[i] for i in idx]
        logit = model(images_0[idx], batch) - model(images_1[idx], batch)
        loss = F.binary_cross_entropy_with_logits(logit, label_0[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def score(model: RewardModel, images: torch.Tensor, captions: list[str], batch_size: int = 512) -> torch.Tensor:
    """The model's scores [N] of images [N, 3, H, W] for their captions."""
    return torch.cat(
        [model(images[i : i + batch_size], captions[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )
