"""Reproduce AG-CNN (Guan et al.) on the NIH ChestX-ray14 sample of cxr-covid (Table I, Fig. 8).

Trains the proposed three-stage model G_L_F (configs/agcnn_cxr14.yaml): stage I the global
branch, stage II the local branch on the heat-map crop (global fixed), stage III the fusion
branch (both fixed), each stage keeping the epoch with its branch's best mean validation AUC.
Reports on the patient-level test split, once: per-label AUC of the global, local and fusion
branches with patient-bootstrap 95% CIs and the number of test positives, and the mean over the
estimable diseases (at least 10 test positives; the others are shown, marked not estimable).
Also: the tau sweep on validation (Fig. 8: stages II and III retrained from the same stage I for
each tau, on a shorter schedule) and how well the crop box covers the annotated boxes
(boxes.csv: NIH and RSNA boxes) on the boxed test images, beside a centred box of the same size.

CPU schedule (the default): EfficientNet-Lite0 (ImageNet) at 224 px, batch 32, stage epochs
12 / 10 / 8 (sweep: 4 / 3), the stem and first two blocks of each backbone frozen. The paper's
setting (50 epochs per stage, batch 128 / 64 / 64, everything trained) is `--paper-schedule`,
for a GPU.

    python benchmarks/reproduce_agcnn.py [--paper-schedule] [--taus 0.1 0.3 0.5 0.7 0.9] [--out DIR]

Writes benchmarks/results/reproduce_agcnn.json and reproduce_agcnn.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BRANCHES = ("global", "local", "fusion")
# Table I, ResNet-50 rows, in NIH_LABELS order (Pneu1 = Pneumonia, Pneu2 = Pneumothorax).
PAPER_TABLE_I = {
    "global": [0.818, 0.904, 0.881, 0.728, 0.863, 0.780, 0.783, 0.897, 0.807, 0.892, 0.918, 0.815, 0.800, 0.889],
    "local": [0.798, 0.881, 0.862, 0.707, 0.826, 0.736, 0.716, 0.872, 0.805, 0.874, 0.898, 0.808, 0.770, 0.887],
    "fusion": [0.844, 0.937, 0.904, 0.753, 0.893, 0.827, 0.776, 0.919, 0.842, 0.919, 0.941, 0.857, 0.836, 0.903],
}
PAPER_MEAN = {"global": 0.841, "local": 0.817, "fusion": 0.868}
PAPER_FIG8_NOTE = "Fig. 8 (validation, ResNet-50): AG-CNN mean AUC highest (> 0.866) for tau in [0.6, 0.8], best at 0.7"
CPU_EPOCHS = (12, 10, 8)
SWEEP_EPOCHS = (4, 3)
EARLY_LAYERS = ("backbone.conv_stem", "backbone.bn1", "backbone.blocks.0", "backbone.blocks.1")
PAPER_BATCH = (128, 64, 64)


def cpu_schedule(cfg: dict, epochs=CPU_EPOCHS) -> dict:
    """The CPU setting: batch 32, fewer epochs per stage, each trained backbone's stem and first two
    blocks frozen (their ImageNet filters kept; a third of the step's time)."""
    cfg = copy.deepcopy(cfg)
    for stage, n in zip(cfg["stages"], epochs):
        stage["train"] = {**stage.get("train", {}), "epochs": n, "batch_size": 32, "patience": n}
        for branch in ("global_branch", "local_branch"):
            if branch not in stage["freeze"]:
                stage["freeze"] = [*stage["freeze"], *(f"{branch}.{m}" for m in EARLY_LAYERS)]
    return cfg


def evaluate_branches(model_path: Path, out_dir: Path, n_boot: int) -> dict:
    from chestdx.evaluate.run import evaluate_bundle

    metrics = evaluate_bundle(model_path, out_dir, n_boot=n_boot, shortcut_probe=False)
    tests = {"fusion": metrics["test"], **metrics.get("test_heads", {})}
    out = {}
    for branch in BRANCHES:
        t = tests[branch]
        out[branch] = {"test": {
            "mean_auc": t["macro_auc"], "mean_auc_ci": t.get("macro_auc_ci"),
            "estimable_labels": t["estimable_labels"],
            "per_label": {name: {"auc": v["auc"], "auc_ci": v.get("auc_ci"), "positives": v["positives"],
                                 "estimable": v["estimable"]} for name, v in t["per_label"].items()},
        }}
    return out


def validation_means(model_path: Path) -> dict:
    """Each branch's mean validation AUC over the estimable diseases and over every disease with a
    positive (the score stages select on)."""
    from chestdx.data.datasets import get_dataset
    from chestdx.evaluate.metrics import multilabel_metrics
    from chestdx.evaluate.run import predict_split
    from chestdx.inference import Predictor

    predictor = Predictor(model_path)
    val = predict_split(predictor, get_dataset(predictor.bundle["config"]["dataset"]).manifest().subset("val"))
    out = {}
    for head in predictor.heads:
        y, known = val["targets"][head.name]
        m = multilabel_metrics(y, val["probs"][head.name], known, head.labels, predictor.thresholds[head.name],
                               mean_over=head.averaged)
        out[head.name] = {"mean_auc_estimable": m["macro_auc"], "estimable_labels": m["estimable_labels"],
                          "mean_auc_selection": head.score(y, val["probs"][head.name], known)}
    return out


def tau_sweep(cfg: dict, stage0: Path, taus, out_dir: Path, paper: bool) -> dict:
    """Stages II and III retrained from the same stage I bundle for each tau (Fig. 8), on validation."""
    from chestdx.train.run import fit, prepare_config
    from chestdx.train.stages import stage_configs

    results = {}
    for tau in taus:
        sweep = copy.deepcopy(cfg)
        sweep["model"]["tau"] = float(tau)
        if not paper:
            sweep = cpu_schedule(sweep, (CPU_EPOCHS[0], *SWEEP_EPOCHS))
        previous = stage0
        for folder, stage_cfg, freeze in stage_configs(prepare_config(sweep))[1:]:
            previous = fit(stage_cfg, out_dir / f"tau{tau:.1f}" / folder, progress=False, init_from=previous,
                           freeze=freeze)
        results[f"{tau:.1f}"] = validation_means(previous)
        print(f"tau {tau:.1f}: " + ", ".join(f"{b} {results[f'{tau:.1f}'][b]['mean_auc_estimable']:.3f}"
                                               for b in ("local", "fusion")), file=sys.stderr)
    return results


def crop_vs_boxes(model_path: Path) -> dict:
    """On the test images with annotated boxes: the share of boxes whose centre lies inside the crop
    box, and the IoU of crop and annotated box, beside a centred box of the crop's size."""
    import torch

    from chestdx.data.datasets import get_dataset
    from chestdx.data.io import read_image
    from chestdx.evaluate.metrics import mean_with_ci
    from chestdx.explain.localization import box_iou
    from chestdx.inference import Predictor

    def _iou(a, b):  # (x0, y0, x1, y1) boxes as box_iou's (y, x) half-open intervals
        return box_iou([(a[1], a[3]), (a[0], a[2])], [(b[1], b[3]), (b[0], b[2])])

    predictor = Predictor(model_path)
    info = get_dataset(predictor.bundle["config"]["dataset"])
    test = info.manifest().subset("test").frame
    boxes = info.boxes()
    boxes = boxes[boxes["path"].isin(set(test["path"]))]
    patient = dict(zip(test["path"], test["patient_id"]))
    rows = []
    for path, group in boxes.groupby("path"):
        image = read_image(info.folder() / path).to_gray()
        height, width = image.shape
        _, x = predictor.prepare(image)
        with torch.no_grad():
            box = predictor.model(x)["boxes"][0].numpy()
        side = predictor.bundle["preprocess"]["size"]
        crop = box * np.array([width, height, width, height]) / side  # the model's grid is a stretched square
        cw, ch = crop[2] - crop[0], crop[3] - crop[1]
        centred = np.array([(width - cw) / 2, (height - ch) / 2, (width + cw) / 2, (height + ch) / 2])
        for _, b in group.iterrows():
            truth = np.array([b.x, b.y, b.x + b.w, b.y + b.h])
            cx, cy = b.x + b.w / 2, b.y + b.h / 2
            rows.append({"path": path, "patient": patient[path], "source": b.source, "finding": b.finding,
                         "centre_in_crop": float(crop[0] <= cx <= crop[2] and crop[1] <= cy <= crop[3]),
                         "iou": _iou(crop, truth), "centre_in_centred": float(
                             centred[0] <= cx <= centred[2] and centred[1] <= cy <= centred[3]),
                         "iou_centred": _iou(centred, truth), "crop_area_share": cw * ch / (width * height)})
    groups = [r["patient"] for r in rows]

    def stat(key):
        return mean_with_ci([r[key] for r in rows], groups, n=1000)

    return {"n_boxes": len(rows), "n_images": len({r["path"] for r in rows}),
            "sources": {s: sum(r["source"] == s for r in rows) for s in sorted({r["source"] for r in rows})},
            "centre_in_crop": stat("centre_in_crop"), "iou": stat("iou"),
            "centred_box_of_same_size": {"centre_in_crop": stat("centre_in_centred"), "iou": stat("iou_centred")},
            "crop_area_share": stat("crop_area_share")}


def markdown(result: dict) -> str:
    from chestdx.data.cxr14_labels import CXR14_LABELS, NIH_LABELS

    fmt = lambda v: "-" if v is None or not np.isfinite(v) else f"{v:.3f}"  # noqa: E731
    lines = ["# AG-CNN on cxr14-sample (NIH ChestX-ray14 images of cxr-covid), test split", "",
             f"Setting: {result['setting']['schedule']}. Patient-level split; stages selected on validation; "
             "test reported once; 95% CIs by bootstrap over patients. Labels with fewer than 10 test positives "
             "are not estimable (shown in italics, left out of the mean).", "",
             "| label | test positives | global | local | fusion | paper global | paper local | paper AG-CNN |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in CXR14_LABELS:
        cells = []
        for b in BRANCHES:
            v = result[b]["test"]["per_label"][name]
            ci = v.get("auc_ci") or [None, None]
            text = f"{fmt(v['auc'])} [{fmt(ci[0])}, {fmt(ci[1])}]"
            cells.append(text if v["estimable"] else f"*{text}*")
        paper = [fmt(PAPER_TABLE_I[b][NIH_LABELS.index(name)]) if name in NIH_LABELS else "-" for b in BRANCHES]
        positives = result["global"]["test"]["per_label"][name]["positives"]
        lines.append(f"| {name} | {positives} | " + " | ".join(cells + paper) + " |")
    estimable = result["global"]["test"]["estimable_labels"]
    means = []
    for b in BRANCHES:
        t = result[b]["test"]
        ci = t.get("mean_auc_ci") or [None, None]
        means.append(f"**{fmt(t['mean_auc'])} [{fmt(ci[0])}, {fmt(ci[1])}]**")
    paper_sub = [fmt(np.mean([PAPER_TABLE_I[b][NIH_LABELS.index(n)] for n in estimable])) for b in BRANCHES]
    lines.append(f"| mean, estimable ({len(estimable)}) | | " + " | ".join(means + paper_sub) + " |")
    lines.append("| mean, 14 (paper) | | | | | " + " | ".join(fmt(PAPER_MEAN[b]) for b in BRANCHES) + " |")
    sweep = result.get("tau_sweep", {}).get("validation", {})
    if sweep:
        lines += ["", "## tau sweep on validation (Fig. 8)", "",
                  result["tau_sweep"]["note"], "",
                  "| tau | global | local | fusion |", "| --- | --- | --- | --- |"]
        for tau, v in sweep.items():
            lines.append(f"| {tau} | " + " | ".join(fmt(v[b]["mean_auc_estimable"]) for b in BRANCHES) + " |")
    crop = result.get("crop_vs_boxes")
    if crop:
        ci = lambda e: f"{e['mean']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]"  # noqa: E731
        c = crop["centred_box_of_same_size"]
        lines += ["", f"## Crop box vs annotated boxes ({crop['n_boxes']} boxes on {crop['n_images']} test images: "
                  f"{crop['sources']})", "",
                  "| box | annotated centre inside | IoU with annotated box |", "| --- | --- | --- |",
                  f"| AG-CNN crop (tau {result['setting']['tau']}) | {ci(crop['centre_in_crop'])} | {ci(crop['iou'])} |",
                  f"| centred box of the same size | {ci(c['centre_in_crop'])} | {ci(c['iou'])} |",
                  "", f"The crop covers {ci(crop['crop_area_share'])} of the image on average."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper-schedule", action="store_true", help="the config as written (50 epochs per stage)")
    parser.add_argument("--taus", type=float, nargs="*", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce_agcnn")
    args = parser.parse_args()

    import torch

    import chestdx.evaluate.run  # noqa: F401  (loaded now: the run must not pick up later edits of the tree)
    import chestdx.inference  # noqa: F401
    from chestdx.train.config import load_config
    from chestdx.train.run import fit
    from chestdx.utils import library_versions, write_json_atomic, write_text_atomic

    started = time.time()
    cfg = load_config(ROOT / "configs" / "agcnn_cxr14.yaml")
    main_cfg = cfg if args.paper_schedule else cpu_schedule(cfg)
    schedule = ("paper: 50 epochs per stage, batch 128/64/64, SGD lr 0.01" if args.paper_schedule else
                f"CPU: stage epochs {'/'.join(map(str, CPU_EPOCHS))}, batch 32, SGD lr 0.01 cosine, stem and "
                "blocks 0-1 of each backbone frozen; EfficientNet-Lite0 (ImageNet) instead of ResNet-50")
    result = {"setting": {"config": "configs/agcnn_cxr14.yaml", "schedule": schedule, "dataset": cfg["dataset"],
                          "backbone": cfg["model"]["backbone"], "tau": cfg["model"]["tau"],
                          "stages": [{"name": s["name"], "freeze": s["freeze"], "train": s.get("train", {})}
                                     for s in main_cfg["stages"]],
                          "device": "cuda" if torch.cuda.is_available() else "cpu",
                          "threads": torch.get_num_threads(), "libraries": library_versions()}}
    model_path = fit(copy.deepcopy(main_cfg), args.out / "glf", progress=False)
    result["seconds_train"] = time.time() - started
    result.update(evaluate_branches(model_path, args.out / "glf" / "eval", args.bootstrap))
    result["validation"] = validation_means(model_path)
    result["crop_vs_boxes"] = crop_vs_boxes(model_path)
    print(json.dumps({b: result[b]["test"]["mean_auc"] for b in BRANCHES}), file=sys.stderr)
    if args.taus:
        epochs = "as the paper" if args.paper_schedule else f"stage II {SWEEP_EPOCHS[0]}, stage III {SWEEP_EPOCHS[1]} epochs"
        result["tau_sweep"] = {
            "note": f"Stages II and III retrained for each tau from the same stage I ({epochs}); mean validation "
                    f"AUC over the estimable diseases. {PAPER_FIG8_NOTE}.",
            "validation": tau_sweep(cfg, args.out / "glf" / "stage0_global" / "model.pt", args.taus,
                                    args.out / "tau_sweep", args.paper_schedule)}
    result["paper"] = {"table_I_resnet50": PAPER_TABLE_I, "mean": PAPER_MEAN}
    result["seconds_total"] = time.time() - started
    out = ROOT / "benchmarks" / "results" / "reproduce_agcnn.json"
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), markdown(result))
    print(f"results: {out}", file=sys.stderr)
    print(json.dumps({b: {"mean_auc": result[b]["test"]["mean_auc"], "ci": result[b]["test"]["mean_auc_ci"]}
                      for b in BRANCHES} | {"seconds_total": result["seconds_total"]}, indent=2))


if __name__ == "__main__":
    from chestdx.errors import ChestDxError

    try:
        main()
    except ChestDxError as err:  # a run folder from other settings, missing data or weights: one line
        sys.exit(f"error: {err}")
