"""Pictures a radiologist can check: heat-map overlays with a colour bar, masks, a gallery page."""

from __future__ import annotations

import html
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from chestdx.utils import atomic_path, write_text_atomic  # noqa: E402


def overlay_png(gray: np.ndarray, heat: np.ndarray, path, title: str, box=None, alpha: float = 0.45,
                crop=None) -> None:
    """The image in grey, the [0, 1] map in jet on top, a colour bar, the title, the map's box if any
    (white) and the model's own crop box (x0, y0, x1, y1; AG-CNN's local branch input) dashed in lime."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=110)
    ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
    shown = ax.imshow(heat, cmap="jet", vmin=0, vmax=1, alpha=alpha)
    if box is not None:
        (y0, y1), (x0, x1) = box
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="white", lw=1.5))
    if crop is not None:
        x0, y0, x1, y1 = crop
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", lw=1.5,
                                   ls="--", label="model's crop"))
        ax.legend(loc="lower right", fontsize=7, framealpha=0.6)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="attention")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def overlay_rgb(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.45, crop=None) -> np.ndarray:
    """(H, W, 3) uint8 RGB overlay without axes, for the web service; the model's crop box in lime."""
    g = np.clip(gray * 255 + 0.5, 0, 255).astype(np.uint8)
    colour = cv2.applyColorMap(np.clip(heat * 255 + 0.5, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    out = np.clip((1 - alpha) * np.stack([g] * 3, -1) + alpha * colour, 0, 255).astype(np.uint8)
    if crop is not None:
        draw_box(out, crop)
    return out


def draw_box(rgb: np.ndarray, box, colour=(0, 255, 0)) -> np.ndarray:
    """Draw (x0, y0, x1, y1), end-exclusive pixels, into an RGB array in place."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    cv2.rectangle(rgb, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour, 1)
    return rgb


def write_mask_png(mask: np.ndarray, path) -> None:
    with atomic_path(path) as tmp:  # the temporary name keeps the .png suffix OpenCV needs
        if not cv2.imwrite(str(tmp), mask.astype(np.uint8) * 255):
            raise OSError(f"could not write {path}")


def write_gallery(items: list[dict], path, title: str) -> None:
    """items: {image, overlay (relative path), caption}; one card per overlay, grouped by image."""
    cards = []
    for item in items:
        cards.append(
            f'<figure><img src="{html.escape(item["overlay"])}" loading="lazy" alt="{html.escape(item["caption"])}">'
            f'<figcaption><b>{html.escape(item["image"])}</b><br>{html.escape(item["caption"])}</figcaption></figure>')
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; background: #111; color: #eee; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 1rem; }}
figure {{ margin: 0; background: #222; padding: .5rem; border-radius: 6px; }}
img {{ width: 100%; background: #fff; }}
figcaption {{ font-size: .85rem; word-break: break-all; }}
.note {{ color: #fc6; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">Research use only, not for diagnosis.</p>
<div class="grid">
{chr(10).join(cards)}
</div></body></html>
"""
    write_text_atomic(Path(path), page)
