"""External evaluation: a model on a manifest it never saw in training or model selection.

A manifest row is an image (PNG/JPEG/DICOM file) or a series (a DICOM folder, a NIfTI file or a zip
of a series). Its label is mapped onto the model's classes (`--map cap=noncovid`). A 2D model
predicts every slice of a series, and the slice probabilities are aggregated to one result per
series and per patient by `mean`, `max` or `topk` (the mean of the k highest); the choice is
recorded, and all three are reported. A sequence or 3D model predicts each series whole.

Slice-level scoring uses slice labels where they exist (`--slice-labels`, e.g. covid-ct-md's
slices.csv with `series`, `file` and `infection` columns): a slice of a positive series counts as
positive when it is marked as showing disease, and is left out when it is not (a COVID patient's
clear slice shows no COVID); every slice of a negative series is negative. Positives are scored
against all negatives and against the negatives of each original label (COVID slices vs normal
series, vs CAP series). CIs resample patients.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from chestdx.data.transforms import Window
from chestdx.errors import ChestDxError, InputError
from chestdx.inference import BATCH_SIZE

AGGREGATIONS = ("mean", "max", "topk")


@dataclass
class ExternalRow:
    path: Path
    label: str          # as in the manifest
    target: int         # index among the model's classes after mapping
    patient: str
    source: str
    key: str            # the manifest's path cell, matched by slice labels


def label_mapping(pairs, classes) -> dict:
    """{'cap': 'noncovid', ...} from ['cap=noncovid', ...]; the model's own class names map to themselves."""
    mapping = {c: c for c in classes}
    for pair in pairs or []:
        if "=" not in pair:
            raise ChestDxError(f"--map {pair!r}: write LABEL=CLASS, e.g. cap=noncovid")
        label, target = (s.strip() for s in pair.split("=", 1))
        if target not in classes:
            raise ChestDxError(f"--map {pair!r}: {target!r} is not one of the model's classes {list(classes)}")
        mapping[label] = target
    return mapping


def read_external_manifest(csv_path, classes, mapping: dict) -> list[ExternalRow]:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ChestDxError(f"{csv_path}: manifest not found")
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except Exception as err:
        raise ChestDxError(f"{csv_path}: not a readable CSV ({err})") from None
    missing = [c for c in ("path", "label") if c not in frame.columns]
    if missing:
        raise ChestDxError(f"{csv_path}: missing column(s) {', '.join(missing)}")
    unmapped = sorted(set(frame["label"]) - set(mapping))
    if unmapped:
        raise ChestDxError(f"{csv_path}: labels {unmapped} are not among the model's classes {list(classes)}; "
                           f"map them, e.g. --map {unmapped[0]}={classes[0]}")
    rows = []
    for k, r in frame.iterrows():
        path = Path(r["path"]) if Path(r["path"]).is_absolute() else csv_path.parent / r["path"]
        if not r["path"] or not path.exists():
            raise ChestDxError(f"{csv_path}: row {k + 2}: {path} does not exist")
        rows.append(ExternalRow(path, r["label"], list(classes).index(mapping[r["label"]]),
                                r.get("patient_id") or r["path"], r.get("source") or csv_path.parent.name, r["path"]))
    return rows


def read_slice_labels(csv_path, column: str = "infection") -> dict:
    """{(series path cell, file name): 0/1} from a slice table; empty cells are unknown (left out)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ChestDxError(f"{csv_path}: slice labels not found")
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = [c for c in ("series", "file", column) if c not in frame.columns]
    if missing:
        raise ChestDxError(f"{csv_path}: missing column(s) {', '.join(missing)}")
    labels = {}
    for k, r in frame.iterrows():
        if r[column] == "":
            continue
        if r[column] not in ("0", "1", "0.0", "1.0"):
            raise ChestDxError(f"{csv_path}: row {k + 2}: {column} must be 0, 1 or empty, got {r[column]!r}")
        labels[(r["series"], r["file"])] = int(float(r[column]))
    return labels


def is_series(path: Path) -> bool:
    name = path.name.lower()
    return path.is_dir() or name.endswith((".nii", ".nii.gz", ".zip"))


class _SliceInputs(Dataset):
    """Each manifest row as the 2D model's inputs: (S, C, H, W) for a series (its slices in order along
    the slice normal), (1, C, H, W) for an image; decoded in DataLoader workers."""

    def __init__(self, rows, predictor):
        from chestdx.data.dataset import VolumeReader

        self.rows, self.load, self.sample = rows, predictor.load_steps, predictor.sample_steps
        self.hu_window, self.reference = predictor.hu_window, predictor.input_reference
        self.volumes = VolumeReader(hu_window=predictor.hu_window)

    def __len__(self):
        return len(self.rows)

    def _distance(self, image) -> float | None:
        """How far the input lies from the training images (the input check's distance; over its limit
        `chestdx predict` refuses it). Measured, not enforced: an external set is scored whole."""
        from chestdx.data.input_check import reference_distance

        return reference_distance(image, self.reference)["distance"] if self.reference else None

    def _prepare(self, gray: np.ndarray) -> np.ndarray:  # (C, H, W): the same steps as `chestdx predict`
        from chestdx.inference import model_input

        return model_input(self.load, self.sample, gray)

    def grays(self, i) -> tuple[list, list]:
        """Row i as grey images in [0, 1] (a series: its slices in the model's HU window) and their names;
        an image stays a `LoadedImage` (the input check measures it as `chestdx predict` would)."""
        from chestdx.data.io import read_image
        from chestdx.inference import series_source

        row = self.rows[i]
        if not is_series(row.path):
            return [read_image(row.path, hu_window=self.hu_window)], [row.path.name]
        with series_source(row.path) as source:
            vol, hu = self.volumes.volume(source)
        if hu and self.hu_window is None:
            raise InputError(row.path, "a CT series in Hounsfield units, and the model records no HU window")
        array = Window(*self.hu_window)({"image": vol.array})["image"] if hu else vol.array
        files = vol.meta.get("files") or [f"{k:04d}" for k in range(len(array))]
        return [np.asarray(s, dtype=np.float32) for s in array], list(files)

    def __getitem__(self, i):
        try:
            images, files = self.grays(i)
            x = np.stack([self._prepare(_gray(im)) for im in images])
            return {"x": torch.from_numpy(x), "files": files, "error": None,
                    "distance": [self._distance(im) for im in images]}
        except ChestDxError as err:
            return {"x": None, "files": [], "error": str(err), "distance": []}


def _gray(image) -> np.ndarray:
    return image if isinstance(image, np.ndarray) else image.to_gray()


def attention_in_lungs(predictor, rows, slices: pd.DataFrame, positive_name: str, n: int,
                       method: str = "gradcam++") -> dict:
    """Share of the heat map for the positive class inside the lungs (`ct_lung_mask` of the slice as the
    model sees it), on up to n slices per target class spread evenly over the scored ones. Slices
    whose lungs are not found (under 2% of the slice), and all-zero maps, are left out and counted."""
    from chestdx.explain.core import explain
    from chestdx.explain.lungs import ct_lung_mask
    from chestdx.explain.localization import energy_share

    chosen = pd.concat([sub.iloc[np.unique(np.linspace(0, len(sub) - 1, min(n, len(sub))).round().astype(int))]
                        for _, sub in slices.groupby("target") if len(sub)])
    inputs = _SliceInputs(rows, predictor)
    row_of = {row.key: i for i, row in enumerate(rows)}
    shares, no_lungs, empty, areas = {0: [], 1: []}, 0, 0, []
    for key, picked in chosen.groupby("series", sort=False):
        images, _ = inputs.grays(row_of[key])
        prepared = [predictor.prepare(_gray(images[k])) for k in picked["slice_index"]]
        x = torch.cat([p[1] for p in prepared])
        model = predictor.model
        result = (explain(model, x, method, positive_name, predictor.explain_heads)
                  if isinstance(model, torch.nn.Module) else model.explain(x, method, positive_name))
        for (shown, _), heat, target in zip(prepared, result.maps[:, 0], picked["target"]):
            lungs = ct_lung_mask(shown)
            if lungs.mean() < 0.02:
                no_lungs += 1
                continue
            share = energy_share(heat, lungs)
            if np.isnan(share):  # an all-zero map points nowhere
                empty += 1
                continue
            shares[int(target)].append(share)
            areas.append(float(lungs.mean()))
    kept = shares[0] + shares[1]
    return {"method": method, "target": positive_name, "n": len(kept), "no_lungs_found": no_lungs,
            "empty_maps": empty,
            "share_in_lungs": float(np.mean(kept)) if kept else None,
            # A map spread evenly would put this share inside the lungs: the chance level.
            "lung_area_share": float(np.mean(areas)) if areas else None,
            "share_in_lungs_positives": float(np.mean(shares[1])) if shares[1] else None,
            "share_in_lungs_negatives": float(np.mean(shares[0])) if shares[0] else None}


def predict_rows(predictor, rows, batch_size: int = BATCH_SIZE, workers: int = 0, progress=None) -> list[dict]:
    """Per row: its slice (or image) probabilities of the primary head, file names, or an error."""
    out = []
    if predictor.takes_series:
        for row in rows:
            try:
                from chestdx.inference import series_source

                with series_source(row.path) as source:
                    result = predictor.predict_source(source)
                p = np.asarray([result["probabilities"][c] for c in predictor.primary.labels], dtype=np.float32)
                out.append({"probs": p[None] if predictor.primary.task != "binary" else p[1:2],
                            "files": [row.path.name], "error": None, "whole_series": True})
            except ChestDxError as err:
                out.append({"probs": None, "files": [], "error": str(err)})
            if progress:
                progress()
        return out
    from chestdx.inference import decode_loader

    loader = decode_loader(_SliceInputs(rows, predictor), workers)
    primary = predictor.primary.name
    for item in loader:
        if item["error"] is None:
            x = item["x"]
            item["probs"] = np.concatenate([predictor.predict_tensor(x[s:s + batch_size])[primary]
                                            for s in range(0, len(x), batch_size)])
        else:
            item["probs"] = None
        del item["x"]
        out.append(item)
        if progress:
            progress()
    return out


def aggregate(probs: np.ndarray, how: str, top_k: int) -> np.ndarray:
    """One series' probability from its slices' (S,) or (S, K)."""
    p = np.asarray(probs, dtype=np.float64)
    if how == "mean":
        return p.mean(0)
    if how == "max":
        return p.max(0)
    if how == "topk":
        k = max(1, min(int(top_k), len(p)))
        return np.sort(p, axis=0)[-k:].mean(0)
    raise ChestDxError(f"aggregation {how!r}: use one of {', '.join(AGGREGATIONS)}")


def slice_table(rows, predictions, slice_labels: dict, positive: int) -> pd.DataFrame:
    """One row per scored slice (or image): its target under the slice-label rule above."""
    records = []
    for row, pred in zip(rows, predictions):
        if pred["probs"] is None or pred.get("whole_series"):
            continue
        distances = pred.get("distance") or [None] * len(pred["files"])
        for k, (file, p, distance) in enumerate(zip(pred["files"], pred["probs"], distances)):
            marked = slice_labels.get((row.key, file))
            if row.target == positive and marked == 0:
                continue  # a clear slice of a positive series: neither class at slice level
            records.append({"series": row.key, "patient_id": row.patient, "source": row.source, "label": row.label,
                            "file": file, "slice_index": k, "marked": marked, "target": int(row.target == positive),
                            "p": float(p) if np.ndim(p) == 0 else float(p[positive]), "input_distance": distance})
    return pd.DataFrame.from_records(records, columns=["series", "patient_id", "source", "label", "file",
                                                       "slice_index", "marked", "target", "p", "input_distance"])


def input_distance_summary(slices: pd.DataFrame, limit: float | None, threshold: float, n_boot: int) -> dict:
    """How much of the set the input check would refuse (distance over its limit), per label, and the
    slice AUCs on what it would let through: whether the model is scored on inputs it was made for."""
    d = pd.to_numeric(slices["input_distance"], errors="coerce")
    if limit is None or d.isna().all():
        return {"measured": False, "why": "the bundle records no input reference"}
    beyond = d > limit
    out = {"measured": True, "limit": float(limit), "median_distance": float(d.median()),
           "share_beyond_limit": float(beyond.mean()),
           "share_beyond_limit_by_label": {k: float(v) for k, v in beyond.groupby(slices["label"]).mean().items()}}
    within = slices[~beyond.to_numpy()]
    if within["target"].nunique() == 2:
        scores = _scores(within, "p", threshold, n_boot)
        out["within_limit"] = {k: v for k, v in scores.items() if k == "all_negatives" or k.startswith("vs_")}
    return out


def _auc_ci(y, p, groups, n_boot: int) -> dict:
    from chestdx.evaluate.metrics import binary_metrics, bootstrap_ci

    y, p = np.asarray(y), np.asarray(p)
    if len(np.unique(y)) < 2:
        return {"auc": None, "auc_ci": None, "n": int(len(y)), "n_positive": int(y.sum()),
                "why": "one class only: no AUC"}
    ci = bootstrap_ci(y, p, groups, lambda a, b: {"auc": binary_metrics(a, b)["auc"]}, n=n_boot)["auc"]
    return {"auc": binary_metrics(y, p)["auc"], "auc_ci": ci, "n": int(len(y)), "n_positive": int(y.sum()),
            "n_patients": int(len(set(groups)))}


def _scores(table: pd.DataFrame, score: str, threshold: float, n_boot: int, negatives_by="label") -> dict:
    """AUC with CI against all negatives and against each negative label; metrics at the thresholds;
    calibration; per source."""
    from chestdx.evaluate.calibration import calibration_summary
    from chestdx.evaluate.metrics import evaluate_binary

    y, p, groups = table["target"].to_numpy(), table[score].to_numpy(), table["patient_id"].to_numpy()
    out = {"all_negatives": _auc_ci(y, p, groups, n_boot)}
    positives = table[table["target"] == 1]
    for label in sorted(set(table.loc[table["target"] == 0, negatives_by])):
        sub = pd.concat([positives, table[(table["target"] == 0) & (table[negatives_by] == label)]])
        out[f"vs_{label}"] = _auc_ci(sub["target"], sub[score], sub["patient_id"].to_numpy(), n_boot)
    if len(np.unique(y)) == 2:
        out["at_thresholds"] = evaluate_binary(y, p, groups, threshold, n_boot=n_boot)
        out["calibration"] = calibration_summary(y, p)
        sources = table["source"].to_numpy()
        out["by_source"] = {s: _auc_ci(y[sources == s], p[sources == s], groups[sources == s], n_boot)
                            for s in sorted(set(sources))}
    return out


def series_table(rows, predictions, positive: int, top_k: int) -> pd.DataFrame:
    records = []
    for row, pred in zip(rows, predictions):
        record = {"series": row.key, "patient_id": row.patient, "source": row.source, "label": row.label,
                  "target": int(row.target == positive), "n_slices": len(pred["files"]), "error": pred["error"]}
        if pred["probs"] is not None:
            p = np.asarray(pred["probs"])
            p = p if p.ndim == 1 else p[:, positive]
            record.update({how: float(aggregate(p, how, top_k)) for how in AGGREGATIONS})
        records.append(record)
    return pd.DataFrame.from_records(records)


def evaluate_external(bundle_path, manifest_csv, out_dir, mapping_pairs=(), slice_labels_csv=None,
                      slice_label_column: str = "infection", aggregation: str = "topk", top_k: int = 5,
                      positive: str | None = None, n_boot: int = 1000, batch_size: int = BATCH_SIZE, workers: int = 0,
                      backend: str = "auto", progress: bool = True, attention_slices: int = 24) -> dict:
    """Predict every row, score slices (or images), series and patients, write the report; returns metrics.
    `attention_slices`: heat maps on that many positive and as many negative slices, scored by their
    share inside the lungs (0: none; 2D models)."""
    from chestdx.evaluate.calibration import calibration_summary
    from chestdx.evaluate.plots import plot_reliability, plot_roc
    from chestdx.evaluate.report import write_external_report
    from chestdx.inference import predictor_for
    from chestdx.utils import atomic_path, write_json_atomic

    if aggregation not in AGGREGATIONS:
        raise ChestDxError(f"--aggregate {aggregation!r}: use one of {', '.join(AGGREGATIONS)}")
    predictor = predictor_for(bundle_path, backend, batch=batch_size)
    classes = list(predictor.primary.labels)
    if predictor.primary.task == "multilabel":
        raise ChestDxError(f"{bundle_path}: external evaluation scores one class against the rest; this model's "
                           f"primary head is multi-label")
    positive_name = positive or ("covid" if "covid" in classes else classes[-1])
    if positive_name not in classes:
        raise ChestDxError(f"--positive {positive_name!r}: not one of the model's classes {classes}")
    pos = classes.index(positive_name)
    rows = read_external_manifest(manifest_csv, classes, label_mapping(mapping_pairs, classes))
    marks = read_slice_labels(slice_labels_csv, slice_label_column) if slice_labels_csv else {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    import time

    started = time.time()
    with _progress(progress, len(rows)) as step:
        predictions = predict_rows(predictor, rows, batch_size=batch_size, workers=workers, progress=step)
    seconds = time.time() - started
    errors = [{"path": str(r.path), "error": p["error"]} for r, p in zip(rows, predictions) if p["error"]]
    slices = slice_table(rows, predictions, marks, pos)
    series = series_table(rows, predictions, pos, top_k)
    scored = series.dropna(subset=["mean"]) if "mean" in series else series.iloc[0:0]
    threshold = predictor.threshold if predictor.threshold is not None else 0.5
    n_images = int(sum(len(p["files"]) for p in predictions))
    metrics = {
        "external": True,
        "statement": "an external set: none of it was used for training, model selection or the threshold",
        "model": predictor.bundle.get("registry_name"), "backend": predictor.backend,
        "trained_on": predictor.bundle.get("config", {}).get("dataset"),
        "manifest": str(manifest_csv), "positive": positive_name, "classes": classes,
        "label_map": {r.label: classes[r.target] for r in rows},
        "slice_rule": "positive: slices of positive series marked as diseased (all its slices where it has no "
                      "slice labels); left out: unmarked slices of positive series; negative: every slice of "
                      "a negative series" if marks else "every slice (or image) takes its series' label",
        "aggregation": {"used": aggregation, "top_k": int(top_k), "patient": "mean over the patient's series"},
        "threshold_from_validation": threshold, "temperature": predictor.temperature.get(predictor.primary.name),
        "n_rows": len(rows), "n_images": n_images, "errors": errors,
        "seconds": seconds, "images_per_second": n_images / seconds if seconds > 0 else None,
    }
    curves, reliability = {}, {}
    if len(slices):
        metrics["slices"] = _scores(slices, "p", threshold, n_boot)
        metrics["input_distance"] = input_distance_summary(
            slices, (predictor.input_reference or {}).get("limit"), threshold, n_boot)
        if attention_slices and predictor.explain_heads is not None:
            try:
                metrics["attention"] = attention_in_lungs(predictor, rows, slices, positive_name, attention_slices)
                metrics["attention_in_lungs"] = metrics["attention"]["share_in_lungs"]
            except ChestDxError as err:  # e.g. an ONNX export without closed-form CAM
                metrics["attention"] = {"n": 0, "why": str(err)}
        curves.update({f"slices {k.replace('_', ' ')}": (sub["target"], sub["p"]) for k, sub in
                       _curve_subsets(slices).items()})
        if slices["target"].nunique() == 2:
            reliability["slices"] = (slices["target"].to_numpy(), slices["p"].to_numpy())
    if len(scored):
        metrics["series"] = {how: _scores(scored, how, threshold, n_boot) for how in AGGREGATIONS}
        metrics["series_rows"] = scored.drop(columns=["error"]).to_dict(orient="records")
        patients = scored.groupby("patient_id").agg(target=("target", "max"), score=(aggregation, "mean"),
                                                    source=("source", "first"), label=("label", "first")).reset_index()
        metrics["patients"] = _scores(patients, "score", threshold, n_boot)
        metrics["patients"]["n"] = int(len(patients))
        if scored["target"].nunique() == 2:
            curves[f"series ({aggregation})"] = (scored["target"], scored[aggregation])
            reliability[f"series ({aggregation})"] = (scored["target"].to_numpy(), scored[aggregation].to_numpy())
            metrics["series_calibration"] = calibration_summary(scored["target"], scored[aggregation])
    if curves:
        plot_roc(curves, out_dir / "roc.png", title="External set")
    if reliability:
        plot_reliability(reliability, out_dir / "reliability.png", title="External set")
    with atomic_path(out_dir / "predictions_slices.csv") as tmp:
        slices.to_csv(tmp, index=False, float_format="%.5f")
    with atomic_path(out_dir / "predictions_series.csv") as tmp:
        series.to_csv(tmp, index=False, float_format="%.5f")
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_external_report(metrics, out_dir, figures=[n for n in ("roc.png", "reliability.png")
                                                     if (out_dir / n).exists()])
    return metrics


def _curve_subsets(slices: pd.DataFrame) -> dict:
    positives = slices[slices["target"] == 1]
    out = {"all negatives": slices}
    for label in sorted(set(slices.loc[slices["target"] == 0, "label"])):
        out[f"vs {label}"] = pd.concat([positives, slices[(slices["target"] == 0) & (slices["label"] == label)]])
    return {k: v for k, v in out.items() if v["target"].nunique() == 2}


class _progress:
    """A rich progress bar over the manifest's rows (nothing when off)."""

    def __init__(self, on: bool, total: int):
        self.on, self.total = on, total

    def __enter__(self):
        if not self.on:
            return None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.start()
        task = self.bar.add_task("predicting", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.on:
            self.bar.stop()
        return False
