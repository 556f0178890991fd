"""Explain image files with a model bundle, and score maps against reference boxes and masks.

Maps live on the model's input grid (the image after the bundle's resize). References (boxes,
masks) are carried onto that grid by the same resize, so scores compare like with like.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from chestdx.data.io import read_image
from chestdx.errors import ChestDxError
from chestdx.explain.core import explain, method_name
from chestdx.explain.localization import energy_share, localize, summarise, xywh_box
from chestdx.explain.lungs import ct_lung_mask
from chestdx.data.transforms import Resize
from chestdx.explain.postprocess import bounding_box, box_to_mask, box_to_xywh, largest_component, threshold_mask
from chestdx.explain.render import overlay_png, write_gallery, write_mask_png
from chestdx.inference import Predictor
from chestdx.utils import write_json_atomic, write_text_atomic


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name)


def prepare(predictor: Predictor, path, image=None) -> tuple[np.ndarray, torch.Tensor]:
    """(grey image on the model's grid in [0, 1], model input tensor (1, 1, H, W))."""
    image = image if image is not None else read_image(path, hu_window=predictor.hu_window)
    if image.meta.get("frames", 1) > 1:
        raise ChestDxError(f"{path}: {image.meta['frames']}-frame DICOM given to a 2D model; send one slice")
    return predictor.prepare(image.to_gray())


def _refuse_sequences(predictor: Predictor) -> None:
    if predictor.sample == "sequence":
        raise ChestDxError(f"{predictor.path}: a sequence model explains a whole series: use "
                           "`chestdx predict SERIES --checkpoint ... --montage DIR` (slice maps weighted by the "
                           "sequence attention)")


def explain_files(checkpoint, files, out_dir, method: str = "gradcam++", targets=("predicted",),
                  threshold: float | str = "otsu", on_error=None, batch_size: int = 8) -> list[dict]:
    """Overlay PNG, raw .npy, mask PNG and box JSON per image and target, plus gallery.html."""
    method = method_name(method)
    predictor = Predictor(checkpoint)
    _refuse_sequences(predictor)
    bundle = predictor.bundle
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records, gallery = [], []
    loaded = []
    for i, path in enumerate(files):
        try:
            loaded.append((i, Path(path), *prepare(predictor, path)))
        except ChestDxError as err:
            if on_error is None:
                raise
            on_error(err)
    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start:start + batch_size]
        x = torch.cat([item[3] for item in chunk])
        result = explain(predictor.model, x, method, list(targets), predictor.explain_heads)
        probs, crops = predictor.predict_tensor(x, with_boxes=True)
        for b, (i, path, shown, _) in enumerate(chunk):
            verdict = predictor.describe({name: p[b] for name, p in probs.items()})
            crop = None if crops is None else [float(v) for v in crops[b]]
            if isinstance(verdict["prediction"], list):  # multi-label: the labels above their thresholds
                above = sorted(verdict["prediction"], key=lambda n: -verdict["probabilities"][n])
                label = (", ".join(above[:2]) + (f" +{len(above) - 2}" if len(above) > 2 else "")
                         if above else "no label above its threshold")
                p_label = verdict["probabilities"][above[0]] if above else 0.0
            else:
                label, p_label = verdict["prediction"], verdict["probabilities"][verdict["prediction"]]
            for t, target in enumerate(result.target_names):
                column = result.column_name(b, t)
                heat = result.maps[b, t]
                mask = largest_component(threshold_mask(heat, threshold))
                box = bounding_box(mask)
                stem = f"{i:03d}_{_safe(path.stem)}_{_safe(column)}"
                p_target = float(result.probabilities[b, result.columns[b, t]])
                title = (f"{path.name}\npredicted {label} (p={p_label:.2f}) · "
                         f"{method} for {column} (p={p_target:.2f})")
                overlay_png(shown, heat, out_dir / f"{stem}.png", title, box, crop=crop)
                np.save(out_dir / f"{stem}.npy", heat)
                write_mask_png(mask, out_dir / f"{stem}_mask.png")
                box_json = {"image": str(path), "target": column, "method": method, "threshold": threshold,
                            "box": box_to_xywh(box) if box else None, "grid": list(heat.shape)}
                write_json_atomic(out_dir / f"{stem}_box.json", box_json)
                records.append({"image": str(path), "target": column, "requested": target, "overlay": f"{stem}.png",
                                "map": f"{stem}.npy", "mask": f"{stem}_mask.png", "box": box_json["box"],
                                "target_probability": p_target, "prediction": verdict["prediction"],
                                "model_crop_box": crop,
                                "probabilities": verdict["probabilities"],
                                **{h.name: verdict.get(h.name) for h in predictor.heads if h.name in verdict}})
                gallery.append({"image": path.name, "overlay": f"{stem}.png",
                                "caption": f"{method} · {column} (p={p_target:.2f}) · predicted {label}"})
    write_gallery(gallery, out_dir / "gallery.html", f"chestdx explanations: {method}, model {bundle['registry_name']}")
    write_json_atomic(out_dir / "explanations.json", records)
    return records


def _reference_on_grid(predictor: Predictor, mask: np.ndarray) -> np.ndarray:
    """A full-resolution reference mask resized exactly as the image was."""
    resize = next(s for s in predictor.load_steps.steps if isinstance(s, Resize))
    return resize({"image": mask.astype(np.float32)[None]})["image"][0] >= 0.5


def evaluate_localization(checkpoint, manifest_csv, out_dir, method: str = "gradcam++", target="predicted",
                          split: str | None = "test", boxes_csv=None, mask_column: str | None = None,
                          lungs: str | None = None, threshold: float | str = 0.5, limit: int = 0,
                          n_boot: int = 1000) -> dict:
    """IoU, box IoU, pointing game and energy inside the reference, per class with CIs.

    References: `boxes_csv` (path, x, y, w, h in image pixels) and/or `mask_column` of the
    manifest (paths of binary masks). `lungs`: a manifest column of lung masks, or 'ct' for the
    classical CT lung mask, for the share of energy inside the lungs.
    """
    predictor = Predictor(checkpoint)
    _refuse_sequences(predictor)
    bundle = predictor.bundle
    manifest_csv = Path(manifest_csv)
    root = manifest_csv.parent
    frame = pd.read_csv(manifest_csv)
    if split:
        frame = frame[frame["split"] == split]
    boxes = pd.read_csv(boxes_csv) if boxes_csv else None
    if boxes is not None:
        frame = frame[frame["path"].isin(set(boxes["path"]))]
    if mask_column:
        frame = frame[frame[mask_column].notna()]
    if lungs and lungs != "ct" and boxes is None and not mask_column:  # only the lung share: rows with lungs
        frame = frame[frame[lungs].notna()]
    if limit:
        frame = frame.head(limit)
    if frame.empty:
        raise ChestDxError(f"{manifest_csv}: no rows with references to score (split={split})")
    rows = []
    for _, row in frame.iterrows():
        image = read_image(root / row["path"], hu_window=predictor.hu_window)
        shown, x = prepare(predictor, root / row["path"], image)
        full_shape = image.pixels.shape[:2]
        result = explain(predictor.model, x, method, target, predictor.explain_heads)
        heat = result.maps[0, 0]
        ref_mask, ref_boxes = None, None
        if mask_column:
            ref_mask = _reference_on_grid(predictor, read_image(root / row[mask_column]).to_gray() >= 0.5)
        if boxes is not None:
            ref_boxes = []
            for _, b in boxes[boxes["path"] == row["path"]].iterrows():
                full = box_to_mask(full_shape, xywh_box(b["x"], b["y"], b["w"], b["h"]))
                box = bounding_box(_reference_on_grid(predictor, full))
                if box:
                    ref_boxes.append(box)
        scores = localize(heat, ref_mask, ref_boxes, threshold) if (ref_mask is not None or ref_boxes) else {}
        if lungs:
            lung = ct_lung_mask(shown) if lungs == "ct" else (
                _reference_on_grid(predictor, read_image(root / row[lungs]).to_gray() >= 0.5)
                if isinstance(row.get(lungs), str) else None)
            scores["energy_in_lungs"] = energy_share(heat, lung) if lung is not None and lung.any() else np.nan
        rows.append({"path": row["path"], "label": row["label"], "patient_id": row["patient_id"], **scores})
    metric_rows = [{k: v for k, v in r.items() if k not in ("path", "label", "patient_id")} for r in rows]
    summary = summarise(metric_rows, [r["patient_id"] for r in rows], [r["label"] for r in rows], n_boot)
    out = {"method": method, "target": target, "threshold": threshold, "split": split, "n_images": len(rows),
           "model": bundle["registry_name"], "by_class": summary}
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / "localization.json", out)
    write_text_atomic(out_dir / "localization_per_image.csv", pd.DataFrame(rows).to_csv(index=False, float_format="%.4f"))
    return out
