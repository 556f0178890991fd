"""MAG-SD's attention guided augmentation (Sec. III-C, Eq. 2-4, Fig. 5), on batches of tensors.

For each image, maps are drawn from its M attention maps with replacement, with probability
proportional to sqrt(sum of the map), and normalised by their maximum (A*). Then:
- mixup (Eq. 2-3): D = A* > theta_m, theta_m ~ U(0.4, 0.6); the box around D, padded by 10%,
  is cropped, zoomed to the image size and blended: I1 = 0.6 I0 + 0.4 B;
- patching: D's box (theta ~ U(0.4, 0.6)) is pasted at a random position of I0 (I2);
- dimming (Eq. 4): pixels where A* > theta_d, theta_d ~ U(0.2, 0.5), are multiplied by 0.001 (I3).
Thresholds are drawn per image. Maps are upsampled bilinearly to the image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("mixup", "dimming", "patching")
MIX_GAMMA = 0.6
BOX_PADDING = 0.1
DIM_FACTOR = 0.001


def pick_maps(attention: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, k, h, w): k maps per image drawn with replacement, p ~ sqrt(sum of map), each / its max."""
    b, m = attention.shape[:2]
    weights = attention.detach().clamp(min=0).flatten(2).sum(-1).sqrt() + 1e-12
    index = torch.multinomial(weights / weights.sum(1, keepdim=True), k, replacement=True, generator=generator)
    chosen = attention.detach().gather(1, index[:, :, None, None].expand(-1, -1, *attention.shape[2:]))
    return chosen / chosen.flatten(2).amax(-1).clamp(min=1e-12)[:, :, None, None]


def _upsampled(a_star: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(a_star[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _thresholds_and_maps(images, a_star, lo: float, hi: float, generator, theta):
    """Per-image thresholds ~ U(lo, hi) (unless given) and the maps at the image size."""
    if theta is None:
        theta = lo + (hi - lo) * torch.rand(images.shape[0], generator=generator)
    return theta, _upsampled(a_star, images.shape[-2:])


def region_box(mask: torch.Tensor, padding: float = 0.0) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), half-open, of a boolean (H, W) mask, grown by `padding` of its size."""
    h, w = mask.shape
    if not mask.any():
        return 0, h, 0, w
    rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    py, px = round((y1 - y0) * padding), round((x1 - x0) * padding)
    return max(0, y0 - py), min(h, y1 + py), max(0, x0 - px), min(w, x1 + px)


def attention_mixup(images, a_star, generator=None, theta=None):
    """Eq. 2-3: blend each image with the zoomed box around its attended region."""
    b, _, h, w = images.shape
    theta, maps = _thresholds_and_maps(images, a_star, 0.4, 0.6, generator, theta)
    out = images.clone()
    for i in range(b):
        y0, y1, x0, x1 = region_box(maps[i] > theta[i], BOX_PADDING)
        zoom = F.interpolate(images[i:i + 1, :, y0:y1, x0:x1], size=(h, w), mode="bilinear", align_corners=False)
        out[i] = MIX_GAMMA * images[i] + (1 - MIX_GAMMA) * zoom[0]
    return out


def attention_patching(images, a_star, generator=None, theta=None):
    """The attended box pasted at a random position of the same image."""
    b, _, h, w = images.shape
    theta, maps = _thresholds_and_maps(images, a_star, 0.4, 0.6, generator, theta)
    out = images.clone()
    for i in range(b):
        y0, y1, x0, x1 = region_box(maps[i] > theta[i])
        ph, pw = y1 - y0, x1 - x0
        ty = int(torch.randint(0, h - ph + 1, (1,), generator=generator))
        tx = int(torch.randint(0, w - pw + 1, (1,), generator=generator))
        out[i, :, ty:ty + ph, tx:tx + pw] = images[i, :, y0:y1, x0:x1]
    return out


def attention_dimming(images, a_star, generator=None, theta=None):
    """Eq. 4: the attended pixels multiplied by 0.001, the rest unchanged."""
    theta, maps = _thresholds_and_maps(images, a_star, 0.2, 0.5, generator, theta)
    mask = torch.where(maps > theta[:, None, None], DIM_FACTOR, 1.0)
    return images * mask[:, None]


_FUNCTIONS = {"mixup": attention_mixup, "patching": attention_patching, "dimming": attention_dimming}


def augment(images: torch.Tensor, attention: torch.Tensor, which=AUGMENTATIONS,
            generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One augmented batch per enabled augmentation, each from its own drawn map (Fig. 5)."""
    which = [w for w in AUGMENTATIONS if w in which]
    if not which:
        return {}
    maps = pick_maps(attention, len(which), generator)
    with torch.no_grad():
        return {name: _FUNCTIONS[name](images, maps[:, k], generator) for k, name in enumerate(which)}
