"""Reproduce the dual-sampling attention network (Ouyang et al., TMI 2020) on what exists here.

No public set of COVID and CAP volumes with infection masks fits this workplace, so:

1. Phantoms (chestdx.data.phantoms): synthetic chest CT volumes whose infections (and so the right
   attention) are known, COVID larger / peripheral / bilateral, CAP smaller / unilateral / denser,
   sizes overlapping. The four rows of Table II trained by their configs (configs/dsan_*.yaml) at a
   small grid on the CPU (48 x 96 x 96 at 5 x 3.5 x 3.5 mm, ResNet34 at a quarter of its width), the
   test split scored once with 95% CIs; localization of T(A) and of 3D Grad-CAM against the phantom
   masks (IoU at 0.5 and pointing game) with and without L_ex; Table III (per infection-size group).
   DS weighs its two models by the ratio from the masks, as the paper does with its segmentations
   (`ds`), and by the ratio estimated from its own attention (`ds_attention_ratio`, what a user
   without masks gets).
2. covid-ct-md: the DS model as it is, end to end from each of the six DICOM series: probability,
   estimated infection ratio, the share of attention inside the lungs and on the slices the
   radiologists marked as infected (against the share of lung on those slices). Six series, a model
   trained on phantoms: no accuracy claim.
3. Speed at the paper's size (138 x 256 x 256, full-width ResNet34, untrained weights: speed does
   not depend on them): seconds per volume with ONNX Runtime and PyTorch, and the peak memory of one
   training step (both the benchmark's batch and one full-size volume).

Writes benchmarks/results/reproduce_dsan.json and .md (to --out when the recipe changes).

    python benchmarks/reproduce_dsan.py [--n 300] [--epochs 20] [--only phantoms|ctmd|speed] [--set key=value]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ROWS = {"rn34_us": "dsan_rn34_us.yaml", "attention_rn34_us": "dsan_attention_us.yaml",
        "attention_rn34_ss": "dsan_attention_ss.yaml"}
GRID = [48, 96, 96]
SPACING = [5.0, 3.5, 3.5]


def cpu_overrides(manifest: Path, epochs: int, extra: list[str]) -> list[str]:
    step = max(1, round(epochs / 4))  # the paper's /10 every 5 of 20 epochs, scaled to the run
    return [f"dataset={manifest}", f"preprocess.size={GRID}", f"preprocess.spacing={SPACING}",
            "model.widen_factor=0.25", "train.batch_size=8", f"train.epochs={epochs}", f"train.patience={epochs}",
            f"train.lr_step_epochs={step}", "train.lr=1.0e-3", "evaluate.bootstrap=1000", *extra]


def train_rows(manifest: Path, runs: Path, epochs: int, extra: list[str]) -> dict:
    from chestdx.train.config import load_config
    from chestdx.train.run import fit

    out = {}
    for row, config in ROWS.items():
        cfg = load_config(ROOT / "configs" / config, cpu_overrides(manifest, epochs, extra))
        started = time.time()
        path = fit(cfg, runs / row, progress=False)
        out[row] = {"bundle": path, "seconds": time.time() - started, "config": config}
        print(f"[dsan] trained {row} in {out[row]['seconds']:.0f} s", flush=True)
    return out


def predict_test(models: dict, bundle_path: Path, test) -> dict:
    """Each row's test probabilities, T(A) and Grad-CAM volumes (COVID cases), on the model grid."""
    import torch

    from chestdx.explain.volume import grad_cam_3d
    from chestdx.inference import Predictor
    from chestdx.models.dsan import DualSamplingEnsemble

    data = test_dataset(bundle_path, test)
    ratios = test.frame["infection_ratio"].to_numpy(dtype=float)
    covid = np.asarray(data.head_arrays("diagnosis")[0]) == 1
    results = {}
    for row, model in models.items():
        probs, attention, attention_map, gradcam, estimated = [], [], [], [], []
        for i in range(len(data)):
            x = data[i]["image"][None]
            with torch.no_grad():
                kwargs = {"ratio": torch.tensor([ratios[i]])} if row == "ds" else {}
                out = model(x, **kwargs)
                if isinstance(model, DualSamplingEnsemble):
                    estimated.append(float(torch.sigmoid(model(x)["logits"])[0]))
            probs.append(float(torch.sigmoid(out["logits"])[0]))
            if covid[i]:
                attention.append(out["attention"][0, 0].numpy())
                attention_map.append(out["attention_map"][0, 0].numpy())
                members = getattr(model, "members", [model])
                cams = [grad_cam_3d(m, x, m.target_layer()) for m in members]
                w = float(out.get("ensemble_weight", torch.tensor([1.0]))[0]) if len(cams) == 2 else 1.0
                gradcam.append(w * cams[0] + (1 - w) * cams[-1] if len(cams) == 2 else cams[0])
        results[row] = {"prob": np.asarray(probs), "attention": attention, "attention_map": attention_map,
                        "gradcam": gradcam}
        if estimated:
            results["ds_attention_ratio"] = {"prob": np.asarray(estimated), "attention": [], "gradcam": []}
    return {"rows": results, "data": data, "covid": covid, "ratios": ratios}


def test_dataset(bundle_path: Path, test):
    from chestdx.data.dataset import ManifestDataset, reader_for
    from chestdx.data.transforms import build_pipeline
    from chestdx.inference import Predictor

    predictor = Predictor(bundle_path)
    pre = predictor.bundle["preprocess"]
    load, sample = build_pipeline(pre, train=False, spatial_dims=3)
    return ManifestDataset(test, predictor.heads, load, sample, cache="none", read=reader_for("volume", pre))


def table2(pred: dict, patients) -> dict:
    from chestdx.evaluate.metrics import evaluate_binary

    y = pred["covid"].astype(int)
    out = {}
    for row, r in pred["rows"].items():
        m = evaluate_binary(y, r["prob"], patients, 0.5, n_boot=1000)["at_0.5"]
        out[row] = {k: m[k] for k in ("auc", "accuracy", "sensitivity", "specificity", "f1")} | \
                   {f"{k}_ci": m[f"{k}_ci"] for k in ("auc", "accuracy", "sensitivity", "specificity", "f1")}
    return out


def table3(pred: dict) -> dict:
    """Table III: each row's metrics within each infection-size group (ratios from the masks)."""
    from chestdx.evaluate.metrics import binary_metrics
    from chestdx.models.dsan import TABLE3_GROUPS

    y, r = pred["covid"].astype(int), pred["ratios"]
    out = {}
    for name, lo, hi in TABLE3_GROUPS:
        keep = (r >= lo) & (r < hi) if lo > 0 else r < hi
        if name == ">0.030":
            keep = r > lo
        group = {"n_covid": int((y[keep] == 1).sum()), "n_cap": int((y[keep] == 0).sum())}
        for row, res in pred["rows"].items():
            m = binary_metrics(y[keep], res["prob"][keep], 0.5) if keep.any() else {}
            group[row] = {k: m.get(k) for k in ("auc", "accuracy", "sensitivity", "specificity", "f1")}
        out[name] = group
    return out


def localization(pred: dict) -> dict:
    from chestdx.evaluate.metrics import mean_with_ci
    from chestdx.explain.volume import localization_3d

    data, covid = pred["data"], pred["covid"]
    masks = [data.masks[i][0] > 0.5 for i in np.flatnonzero(covid)]
    patients = np.asarray(data.patients)[covid]
    out = {}
    for row, res in pred["rows"].items():
        if not res["attention"]:
            continue
        entry = {}
        # T(A)'s pointing game on A before the sigmoid: T(A) saturates at 1 over its top, and a plateau
        # of maxima would count a hit wherever it touches the mask.
        for kind, maps, peaks in (("attention", res["attention"], res["attention_map"]),
                                  ("gradcam", res["gradcam"], res["gradcam"])):
            scores = [localization_3d(m, mask) for m, mask in zip(maps, masks)]
            iou = mean_with_ci([s["iou"] for s in scores], patients)
            pointing = mean_with_ci([float(localization_3d(m, mask)["pointing"]) for m, mask in zip(peaks, masks)],
                                    patients)
            prefix = "" if kind == "attention" else "gradcam_"
            entry.update({f"{prefix}iou": iou["mean"], f"{prefix}iou_ci": iou["ci"],
                          f"{prefix}pointing": pointing["mean"], f"{prefix}pointing_ci": pointing["ci"]})
        entry["n"] = len(masks)
        out[row] = entry
    return out


def phantom_results(args, runs: Path) -> tuple[dict, Path]:
    from chestdx.data.manifest import Manifest
    from chestdx.data.phantoms import write_phantoms
    from chestdx.models.bundle import load_bundle, make_bundle, save_bundle
    from chestdx.models.dsan import DIAGNOSIS, DualSamplingEnsemble, group_weights, size_groups

    started = time.time()
    manifest_path = write_phantoms(runs / "phantoms", n=args.n, seed=0, shape=tuple(GRID), spacing=tuple(SPACING))
    manifest = Manifest.from_csv(manifest_path)
    print(f"[dsan] {args.n} phantoms in {time.time() - started:.0f} s", flush=True)
    trained = train_rows(manifest_path, runs, args.epochs, args.set)
    models = {row: load_bundle(t["bundle"])[0] for row, t in trained.items()}
    us, ss = models["attention_rn34_us"], models["attention_rn34_ss"]
    models["ds"] = DualSamplingEnsemble([us, ss], [DIAGNOSIS]).eval()
    # The DS bundle (two trained members, Eq. 5): what `dsan_ds.yaml` trains in one run.
    _, us_bundle = load_bundle(trained["attention_rn34_us"]["bundle"])
    ds_cfg = dict(us_bundle["config"], method={**us_bundle["config"]["method"], "sampling": "dual"},
                  train={**us_bundle["config"]["train"], "ensemble": 2}, name="dsan_ds")
    ds_path = save_bundle(make_bundle(models["ds"], ds_cfg), runs / "ds" / "model.pt")
    test = manifest.subset("test")
    pred = predict_test(models, ds_path, test)
    train = manifest.subset("train").frame
    groups = size_groups(train["infection_ratio"], train["label"] == "covid")
    counts = np.bincount(groups, minlength=4)
    result = {
        "n_phantoms": args.n, "grid": GRID, "spacing_mm": SPACING, "epochs": args.epochs,
        "n_test": len(test), "n_test_covid": int(pred["covid"].sum()),
        "table2": table2(pred, pred["data"].patients),
        "localization": localization(pred),
        "table3": table3(pred),
        "sampler": {"train_group_counts": dict(zip(("covid_small", "covid_large", "cap_small", "cap_large"),
                                                   map(int, counts))),
                    "group_weights": [float(w) for w in group_weights(groups)]},
        "train_seconds": {row: round(t["seconds"], 1) for row, t in trained.items()},
        "notes": ("ResNet34 at widen_factor 0.25, lr 1e-3 (the paper's 2e-4 at full width learns too slowly in "
                  f"{args.epochs} epochs here); CIs by bootstrap over test phantoms (one phantom = one patient). "
                  "ds: Eq. 5 with the ratio from the phantom masks; ds_attention_ratio: from the US model's T(A)."),
    }
    return result, ds_path


def covid_ct_md(ds_path: Path, montages: Path | None) -> list[dict]:
    """The DS model on each covid-ct-md series, end to end from its DICOM files."""
    import pandas as pd

    from chestdx.data.dataset import reader_for
    from chestdx.data.datasets import data_root
    from chestdx.inference import Predictor

    folder = data_root() / "covid-ct-md"
    if not (folder / "manifest.csv").is_file():
        return []
    series = pd.read_csv(folder / "manifest.csv")
    slices = pd.read_csv(folder / "slices.csv")
    predictor = Predictor(ds_path)
    pre = predictor.bundle["preprocess"]
    reader = reader_for("volume", pre)
    rows = []
    for _, s in series.iterrows():
        started = time.time()
        verdict, shown, out = predictor.predict_volume(folder / s["path"])
        seconds = time.time() - started
        attention = out["attention"][0]
        lungs = shown > 0
        labels = slices[slices["series"] == s["path"]].sort_values("slice_index")["infection"]
        entry = {"series": s["patient_id"], "label": s["label"], "p_covid": verdict["probabilities"]["covid"],
                 "prediction": verdict["prediction"], "infection_ratio_estimated": verdict.get("infection_ratio"),
                 "attention_in_lungs": verdict.get("attention_in_lungs"), "lung_voxels": int(lungs.sum()),
                 "seconds": round(seconds, 2)}
        if labels.notna().all():
            marked = _marked_slices_on_grid(reader, predictor, folder / s["path"], labels.to_numpy(dtype=float))
            total = float(attention.sum())
            entry["attention_on_marked_slices"] = float(attention[marked].sum() / total) if total else None
            entry["lung_share_of_marked_slices"] = float(lungs[marked].sum() / max(1, lungs.sum()))
        if montages is not None:
            from chestdx.explain.volume import montage_png

            entry["montage"] = str(montage_png(shown, attention, montages / f"{s['patient_id']}.png",
                                               f"{s['patient_id']} ({s['label']}): p(covid) "
                                               f"{entry['p_covid']:.2f}, T(A)"))
        rows.append(entry)
        print(f"[dsan] covid-ct-md {entry['series']}: p(covid) {entry['p_covid']:.3f} in {seconds:.1f} s", flush=True)
    return rows


def _marked_slices_on_grid(reader, predictor, path: Path, labels: np.ndarray) -> np.ndarray:
    """The radiologists' infected slices as a (D, H, W) region on the model's grid: a slice
    indicator on the native grid put through the same resampling and fitting as the input."""
    from chestdx.data.volumes import read_volume

    vol = read_volume(path)
    indicator = np.broadcast_to(labels[:, None, None], vol.array.shape).astype(np.float32)
    resampled = reader.resampled(indicator, vol.spacing, linear=True)[None]
    return predictor.load_steps({"image": resampled[:1] * 0, "mask": (resampled > 0.5).astype(np.float32)})["mask"][0] > 0.5


SPEED_SCRIPT = r"""
import json, resource, sys, time, tempfile, os
import numpy as np, torch
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from chestdx.models.dsan import DSAN, attention_loss
mode, shape, widen, batch = sys.argv[1], tuple(json.loads(sys.argv[2])), float(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
net = DSAN(widen_factor=widen)
x = torch.rand(batch, 1, *shape)
out = {}
if mode == "train":
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, weight_decay=1e-4)
    mask = (torch.rand_like(x) > 0.95).float()
    started = time.time()
    o = net(x)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(o["logits"], torch.ones(batch)) + \
        0.5 * attention_loss(o["attention"], mask, torch.ones(batch, dtype=torch.bool))
    opt.zero_grad(); loss.backward(); opt.step()
    out["train_step_seconds"] = time.time() - started
else:
    net.eval()
    with torch.no_grad():
        net(x)  # warm-up
        started = time.time(); ref = net(x); out["pytorch_seconds_per_volume"] = (time.time() - started) / batch
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dsan.onnx")
        class Wrap(torch.nn.Module):
            def __init__(self, m): super().__init__(); self.m = m
            def forward(self, x): o = self.m(x); return o["logits"], o["attention"]
        torch.onnx.export(Wrap(net), (x,), path, input_names=["image"], output_names=["logits", "attention"],
                          opset_version=17, dynamo=False)
        opts = ort.SessionOptions(); opts.intra_op_num_threads = int(os.environ.get("THREADS", "2"))
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        sess.run(None, {"image": x.numpy()})  # warm-up
        started = time.time(); got = sess.run(None, {"image": x.numpy()})
        out["onnxruntime_seconds_per_volume"] = (time.time() - started) / batch
        out["onnx_max_abs_diff_attention"] = float(np.abs(got[1] - ref["attention"].numpy()).max())
        out["onnx_max_abs_diff_logits"] = float(np.abs(got[0] - ref["logits"].numpy()).max())
# VmHWM: this process's own peak (ru_maxrss would carry the parent's across fork and exec)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
out["peak_rss_mb"] = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def speed() -> dict:
    """Each measurement in its own process, so its peak memory is its own."""
    def run(*argv):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        done = subprocess.run([sys.executable, "-c", SPEED_SCRIPT, *map(str, argv)], capture_output=True, text=True,
                              env=env, timeout=3600)
        if done.returncode:
            raise RuntimeError(done.stderr[-2000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    full = [138, 256, 256]
    infer = run("infer", json.dumps(full), 1.0, 1)
    train_small = run("train", json.dumps(GRID), 0.25, 8)
    train_full = run("train", json.dumps(full), 1.0, 1)
    return {
        "onnxruntime_seconds_per_volume": infer["onnxruntime_seconds_per_volume"],
        "pytorch_seconds_per_volume": infer["pytorch_seconds_per_volume"],
        "onnx_max_abs_diff": {"logits": infer["onnx_max_abs_diff_logits"],
                              "attention": infer["onnx_max_abs_diff_attention"]},
        "inference_peak_mb": infer["peak_rss_mb"],
        "train_peak_mb": train_full["peak_rss_mb"],
        "train_step_seconds": train_full["train_step_seconds"],
        "train_peak_mb_benchmark_batch": train_small["peak_rss_mb"],
        "train_step_seconds_benchmark_batch": train_small["train_step_seconds"],
        "setting": ("inference: one full-width 3D ResNet34 with attention at 138 x 256 x 256, batch 1, 2 threads "
                    "(DS runs two); train_peak_mb: one Adam step on one full-size volume; *_benchmark_batch: the "
                    f"phantom runs' step (batch 8 at {GRID}, width 0.25). The paper: 4.6 s per volume on a TITAN RTX."),
    }


def markdown(result: dict) -> str:
    lines = ["# Dual-sampling attention network (Ouyang et al., TMI 2020) on phantoms and covid-ct-md", ""]
    ph = result.get("phantoms")
    if ph:
        lines += [f"Phantoms: {ph['n_phantoms']} ({ph['n_test']} test, {ph['n_test_covid']} COVID), grid {ph['grid']}, "
                  f"{ph['epochs']} epochs. {ph['notes']}", "",
                  "| row | AUC | accuracy | sensitivity | specificity | F1 |", "|---|---|---|---|---|---|"]
        for row, m in ph["table2"].items():
            cells = [f"{m[k]:.3f} [{m[k + '_ci'][0]:.2f}, {m[k + '_ci'][1]:.2f}]" for k in
                     ("auc", "accuracy", "sensitivity", "specificity", "f1")]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines += ["", "| row | T(A) IoU | T(A) pointing | Grad-CAM IoU | Grad-CAM pointing |", "|---|---|---|---|---|"]
        for row, m in ph["localization"].items():
            lines.append(f"| {row} | {m['iou']:.3f} [{m['iou_ci'][0]:.2f}, {m['iou_ci'][1]:.2f}] | {m['pointing']:.2f} | "
                         f"{m['gradcam_iou']:.3f} [{m['gradcam_iou_ci'][0]:.2f}, {m['gradcam_iou_ci'][1]:.2f}] | "
                         f"{m['gradcam_pointing']:.2f} |")
        lines += ["", "Table III (AUC / sensitivity / specificity per infection-size group):", "",
                  "| group | n covid | n cap | " + " | ".join(ph["table2"]) + " |",
                  "|---|---|---|" + "---|" * len(ph["table2"])]
        for name, g in ph["table3"].items():
            cells = []
            for row in ph["table2"]:
                m = g.get(row, {})
                cells.append(" / ".join("-" if m.get(k) is None or m.get(k) != m.get(k) else f"{m[k]:.2f}"
                                        for k in ("auc", "sensitivity", "specificity")))
            lines.append(f"| {name} | {g['n_covid']} | {g['n_cap']} | " + " | ".join(cells) + " |")
        lines += ["", f"Sampler: train groups {ph['sampler']['train_group_counts']}, weights "
                      f"{[round(w, 2) for w in ph['sampler']['group_weights']]}", ""]
    if result.get("covid_ct_md"):
        lines += ["## covid-ct-md (DS model trained on phantoms, end to end from DICOM; no accuracy claim)", "",
                  "| series | label | p(covid) | ratio (attention) | attention in lungs | on marked slices | lung share of marked slices |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["covid_ct_md"]:
            def f(v):
                return "-" if v is None else f"{v:.3f}"
            lines.append(f"| {r['series']} | {r['label']} | {f(r['p_covid'])} | {f(r['infection_ratio_estimated'])} | "
                         f"{f(r['attention_in_lungs'])} | {f(r.get('attention_on_marked_slices'))} | "
                         f"{f(r.get('lung_share_of_marked_slices'))} |")
        lines.append("")
    if result.get("speed"):
        s = result["speed"]
        lines += ["## Speed", "", f"ONNX Runtime {s['onnxruntime_seconds_per_volume']:.1f} s, PyTorch "
                  f"{s['pytorch_seconds_per_volume']:.1f} s per volume; training peak {s['train_peak_mb']:.0f} MB. "
                  f"{s['setting']}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="phantoms (half COVID)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--only", choices=("phantoms", "ctmd", "speed"), action="append")
    parser.add_argument("--set", action="append", default=[], help="config override for every row")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "dsan")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out_dir = args.out or (RESULTS if not args.set and args.n == 300 and args.epochs == 20 else args.runs / "results")
    json_path = out_dir / "reproduce_dsan.json"
    result = json.loads(json_path.read_text()) if json_path.is_file() else {}
    only = set(args.only or ("phantoms", "ctmd", "speed"))
    ds_path = args.runs / "ds" / "model.pt"
    if "phantoms" in only:
        result["phantoms"], ds_path = phantom_results(args, args.runs)
    if "ctmd" in only:
        if not ds_path.is_file():
            sys.exit(f"{ds_path}: no DS model; run --only phantoms first")
        result["covid_ct_md"] = covid_ct_md(ds_path, args.runs / "montages")
    if "speed" in only:
        result["speed"] = speed()
    from chestdx.utils import write_json_atomic, write_text_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_path, result)
    write_text_atomic(out_dir / "reproduce_dsan.md", markdown(result))
    print(json.dumps({k: v for k, v in result.items() if k != "covid_ct_md"}, indent=1, default=str)[:4000])


if __name__ == "__main__":
    main()
