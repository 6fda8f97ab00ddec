"""The embedded text-to-image task: prompts built from words, images rendered from them, a programmatic reward.

A prompt names one object: ``"a {size} {colour} {shape} at the {position}"`` (6 colours x 3 shapes x 2 sizes x
5 positions = 180 prompts). Its images show that object on a plain grey background, with per-image variation
(background level and tint, object jitter in position, size and colour) so that a prompt has many good images
and a model has diversity to lose.

The reward stands in for human preference. It is computed from pixels, with no learned component:
``reward = 0.8 * fidelity + 0.2 * style`` where fidelity is the mean of four scores in [0, 1] (colour, shape,
size and position of the detected object against the prompt; 0 when no object is found) and style is a
preference for dark backgrounds (1 at black, 0 at a background luminance of 0.6 or more).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.15, 0.15),
    "green": (0.15, 0.8, 0.2),
    "blue": (0.2, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.15),
    "magenta": (0.9, 0.2, 0.85),
    "cyan": (0.15, 0.85, 0.9),
}
SHAPES = ("circle", "square", "triangle")
# Nominal half-extent of the object, as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.16, "large": 0.28}
# Object centroid (x, y) as fractions of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "center": (0.5, 0.5),
}
VOCABULARY = ("a", "at", "the", *SIZES, *COLOURS, *SHAPES, *POSITIONS)
RESOLUTION = 16

# Per-image variation of the rendered data (what the base model learns to vary).
BACKGROUND_RANGE = (0.05, 0.55)
BACKGROUND_TINT = 0.05
POSITION_JITTER = 0.06  # std of the centroid, fraction of the side
SIZE_JITTER = 0.15  # half-extent scaled by U(1 - j, 1 + j)
COLOUR_JITTER = 0.12  # per channel, U(-j, j)

# Reward constants: tolerances of each fidelity score and the weight of the style term.
STYLE_WEIGHT = 0.2
COLOUR_TOLERANCE = 0.25  # RGB distance at which the colour score is exp(-1/2)
POSITION_TOLERANCE = 0.1  # centroid distance (fraction of side) at which the position score is exp(-1/2)
SIZE_TOLERANCE = 0.3  # |log(area ratio)| at which the size score is exp(-1/2)
SHAPE_MARGIN = 0.05  # soft-IoU margin over the best other shape that scores sigmoid(1)
STYLE_DARKEST_PREFERRED = 0.6  # background luminance at which style reaches 0
MIN_OBJECT_AREA = 2.0  # pixels of foreground below which no object is found
# Vendi-score kernel bandwidth, in per-pixel RMS distance (pixels in [0, 1]).
VENDI_BANDWIDTH = 0.1


@dataclass(frozen=True)
class Spec:
    """The content of one prompt."""

    colour: str
    shape: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at the {self.position}"


ALL_SPECS: tuple[Spec, ...] = tuple(Spec(c, s, z, p) for c in COLOURS for s in SHAPES for z in SIZES for p in POSITIONS)


# The fixed order of the prompts that decides the splits below (seeded, so every checkout agrees).
_SPLIT_ORDER = torch.randperm(len(ALL_SPECS), generator=torch.Generator().manual_seed(20240915)).tolist()
HELD_OUT_PROMPTS = 36
NOVEL_PROMPTS = 18


def split_specs() -> tuple[list[Spec], list[Spec]]:
    """The fixed split of the 180 prompts: 144 for preference pairs, 36 held out for evaluation.

    Held out means unseen by the preference fine-tuning; half of them are also unseen by pretraining in a base
    pretrained with ``hold_out_novel`` (see :func:`novel_specs`).
    """
    held = set(_SPLIT_ORDER[:HELD_OUT_PROMPTS])
    return [s for i, s in enumerate(ALL_SPECS) if i not in held], [s for i, s in enumerate(ALL_SPECS) if i in held]


def novel_specs() -> list[Spec]:
    """18 of the 36 held-out prompts, fixed: the ones ``pretrain --hold-out-novel`` leaves out of pretraining.

    A base pretrained without them (the shipped ``assets/base_novel``) has never seen these compositions of
    words it knows, in pretraining or in preference pairs: evaluation on them measures generalisation.
    """
    novel = set(_SPLIT_ORDER[:NOVEL_PROMPTS])
    return [s for i, s in enumerate(ALL_SPECS) if i in novel]


def _spec_tensors(specs: list[Spec]) -> tuple[torch.Tensor, ...]:
    colour = torch.tensor([COLOURS[s.colour] for s in specs])
    shape = torch.tensor([SHAPES.index(s.shape) for s in specs])
    size = torch.tensor([SIZES[s.size] for s in specs])
    position = torch.tensor([POSITIONS[s.position] for s in specs])
    return colour, shape, size, position


def shape_coverage(
    shape: torch.Tensor, centroid: torch.Tensor, radius: torch.Tensor, res: int, supersample: int = 4
) -> torch.Tensor:
    """Anti-aliased coverage [N, res, res] in [0, 1] of each shape, placed by its centroid (pixel units).

    ``radius`` is the half-extent: circle radius, half the square's side, half the triangle's base and height.
    The triangle points up; its centroid sits a third of the half-extent below its bounding-box centre.
    """
    sub = (torch.arange(res * supersample, dtype=torch.float32) + 0.5) / supersample
    y, x = sub[None, :, None], sub[None, None, :]
    cx, cy, r = centroid[:, 0, None, None], centroid[:, 1, None, None], radius[:, None, None]
    circle = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    square = ((x - cx).abs() <= r) & ((y - cy).abs() <= r)
    top = cy - r - r / 3  # apex; the base is at cy + r - r / 3
    triangle = (y >= top) & (y <= top + 2 * r) & ((x - cx).abs() <= (y - top) / 2)
    inside = torch.stack([circle, square, triangle], 1).gather(
        1, shape[:, None, None, None].expand(-1, 1, *circle.shape[1:])
    )
    return torch.nn.functional.avg_pool2d(inside.float(), supersample)[:, 0]


def render(specs: list[Spec], generator: torch.Generator, res: int = RESOLUTION) -> torch.Tensor:
    """Images [N, 3, res, res] in [0, 1] of the given prompts, with the task's per-image variation."""
    n = len(specs)
    colour, shape, size, position = _spec_tensors(specs)
    u = torch.rand(n, 8, generator=generator)
    level = BACKGROUND_RANGE[0] + (BACKGROUND_RANGE[1] - BACKGROUND_RANGE[0]) * u[:, 0]
    background = (level[:, None] + (2 * u[:, 1:4] - 1) * BACKGROUND_TINT).clamp(0, 1)
    radius = size * res * (1 - SIZE_JITTER + 2 * SIZE_JITTER * u[:, 4])
    centroid = (position + POSITION_JITTER * torch.randn(n, 2, generator=generator)) * res
    fill = (colour + (2 * u[:, 5:8] - 1) * COLOUR_JITTER).clamp(0, 1)
    cover = shape_coverage(shape, centroid, radius, res)[:, None]
    return background[:, :, None, None] * (1 - cover) + fill[:, :, None, None] * cover


def _shape_area(shape: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Area (pixels) of a circle / square / triangle of half-extent ``radius``."""
    return torch.tensor([math.pi, 4.0, 2.0])[shape] * radius**2


def detect(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reward's object detector on images [N, 3, H, W] in [0, 1] (no prompt needed).

    The background colour is the median of the border pixels; a pixel is foreground in proportion to its RGB
    distance from it (0 below 0.1, 1 above 0.3). Returns per-image ``background`` [N, 3], ``weight`` (foreground
    map) [N, H, W], ``found`` [N] (foreground area >= MIN_OBJECT_AREA pixels), ``area`` [N] (pixels, at least
    MIN_OBJECT_AREA), ``centroid`` [N, 2] (x, y in pixels), ``colour`` [N, 3] (mean object colour) and ``ious``
    [N, 3] (soft IoU with an ideal circle, square and triangle of the same centroid and area).
    """
    images = images.float().clamp(0, 1)
    n, _, res, _ = images.shape
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, 1:-1, 0], images[:, :, 1:-1, -1]], dim=2)
    background = border.median(dim=2).values
    weight = (((images - background[:, :, None, None]).norm(dim=1) - 0.1) / 0.2).clamp(0, 1)
    area = weight.sum((1, 2))
    found = area >= MIN_OBJECT_AREA
    safe_area = area.clamp_min(MIN_OBJECT_AREA)
    grid = torch.arange(res, dtype=torch.float32) + 0.5
    centroid = torch.stack([(weight * grid[None, None, :]).sum((1, 2)), (weight * grid[None, :, None]).sum((1, 2))], 1)
    centroid = centroid / safe_area[:, None]
    mean_colour = (weight[:, None] * images).sum((2, 3)) / safe_area[:, None]
    ious = []
    for s in range(len(SHAPES)):
        ids = torch.full((n,), s)
        template = shape_coverage(ids, centroid, torch.sqrt(safe_area / _shape_area(ids, torch.ones(n))), res)
        ious.append(torch.minimum(weight, template).sum((1, 2)) / torch.maximum(weight, template).sum((1, 2)))
    return {
        "background": background,
        "weight": weight,
        "found": found,
        "area": safe_area,
        "centroid": centroid,
        "colour": mean_colour,
        "ious": torch.stack(ious, 1),
    }


def reward(images: torch.Tensor, specs: list[Spec]) -> dict[str, torch.Tensor]:
    """The programmatic preference of images [N, 3, H, W] in [0, 1] for their prompts.

    Returns per-image tensors: ``reward`` and its parts ``fidelity``, ``style``, ``colour``, ``shape``,
    ``size``, ``position``. The object is found by :func:`detect`.
    """
    res = images.shape[-1]
    colour_t, shape_t, size_t, position_t = _spec_tensors(specs)
    found_ = detect(images)
    background, found, safe_area = found_["background"], found_["found"], found_["area"]
    centroid, mean_colour = found_["centroid"], found_["colour"]

    colour = torch.exp(-((mean_colour - colour_t).norm(dim=1) ** 2) / (2 * COLOUR_TOLERANCE**2))
    position = torch.exp(-((centroid / res - position_t).norm(dim=1) ** 2) / (2 * POSITION_TOLERANCE**2))
    nominal_area = _shape_area(shape_t, size_t * res)
    size = torch.exp(-(torch.log(safe_area / nominal_area) ** 2) / (2 * SIZE_TOLERANCE**2))
    # Shape: soft IoU with an ideal template of each shape (same centroid and area); the target shape must beat
    # the best other one.
    ious = found_["ious"]
    target_iou = ious.gather(1, shape_t[:, None])[:, 0]
    best_other = ious.scatter(1, shape_t[:, None], -1.0).max(1).values
    shape = torch.sigmoid((target_iou - best_other) / SHAPE_MARGIN)

    fidelity = found * (colour + shape + size + position) / 4
    style = (1 - background.mean(1) / STYLE_DARKEST_PREFERRED).clamp(0, 1)
    total = (1 - STYLE_WEIGHT) * fidelity + STYLE_WEIGHT * style
    return {
        "reward": total,
        "fidelity": fidelity,
        "style": style,
        "colour": found * colour,
        "shape": found * shape,
        "size": found * size,
        "position": found * position,
    }


def pairwise_distance(samples: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel RMS distance between the samples of each prompt: [P, n, ...] -> [P]."""
    flat = samples.flatten(2).float()
    sq = torch.cdist(flat, flat).square() / flat.shape[2]
    n = flat.shape[1]
    return sq.sqrt().sum((1, 2)) / (n * (n - 1))


def vendi_score(samples: torch.Tensor, bandwidth: float = VENDI_BANDWIDTH) -> torch.Tensor:
    """Vendi score (Friedman & Dieng, 2023) of the samples of each prompt: [P, n, ...] -> [P], in [1, n].

    The effective number of distinct samples: exp of the entropy of the eigenvalues of K / n, with the RBF
    kernel K_ij = exp(-rms(x_i - x_j)^2 / (2 bandwidth^2)).
    """
    flat = samples.flatten(2).double()
    sq = torch.cdist(flat, flat).square() / flat.shape[2]
    kernel = torch.exp(-sq / (2 * bandwidth**2))
    eig = torch.linalg.eigvalsh(kernel / flat.shape[1]).clamp_min(0)
    entropy = -torch.special.xlogy(eig, eig).sum(1)
    return entropy.exp().float()


ATTRIBUTES = ("colour", "position", "size", "shape", "background")


def attribute_spread(samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """Spread of each detected attribute over the samples of each prompt: [P, n, 3, H, W] -> {name: [P]}.

    From :func:`detect` (the reward's own detector), the mean over a prompt's pairs of samples of: ``colour``,
    the RGB distance of the object colours; ``position``, the distance of the centroids (fraction of the side);
    ``size``, |log area ratio|; ``shape``, half the L1 distance of the soft-IoU vectors (circle, square,
    triangle), and ``background``, the RGB distance of the background colours (the style term's variation).
    The object attributes average over the pairs in which both samples have an object (0 if no such pair);
    ``found`` is the fraction of samples with one.
    """
    p, n = samples.shape[:2]
    if n < 2:
        raise ValueError(f"attribute_spread needs at least 2 samples per prompt; got {n}")
    det = detect(samples.flatten(0, 1))
    res = samples.shape[-1]
    per = {
        "colour": det["colour"],
        "position": det["centroid"] / res,
        "size": det["area"].log()[:, None],
        "shape": det["ious"],
        "background": det["background"],
    }
    found = det["found"].view(p, n).float()
    both = (found[:, :, None] * found[:, None, :]) * (1 - torch.eye(n))
    off_diagonal = (1 - torch.eye(n)).expand(p, n, n)
    out = {}
    for name, values in per.items():
        values = values.view(p, n, -1).double()
        dist = (torch.cdist(values, values, p=1) / 2) if name == "shape" else torch.cdist(values, values)
        weights = off_diagonal if name == "background" else both
        out[name] = ((dist * weights).sum((1, 2)) / weights.sum((1, 2)).clamp_min(1)).float()
    out["found"] = found.mean(1)
    return out
