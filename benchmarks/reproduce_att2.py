"""Reproduce ResNet50-ATT2 and the Bi-LSTM sequence model (Loconte & Colavito) on what exists here.

1. Slices: ResNet50-ATT2 in its CPU configuration (configs/att2_covidct.yaml: EfficientNet-Lite0,
   ImageNet init) trained on covid-ct with the LA-DNN split, selected on validation, the test split
   scored once with 95% CIs; LA-DNN and the He et al. baseline beside it from
   benchmarks/results/reproduce_ladnn.json (same split, same test images).
2. Sequences (configs/att2_bilstm_covidct.yaml): the Bi-LSTM with soft attention over 16 slices
   embedded by the frozen stage-1 model, on covid-ct-sequences (real covid-ct slices, a run of 3
   COVID slices in each positive: the answer is known): accuracy with CIs, and how often the
   attention peak falls on a COVID slice.
3. covid-ct-md: the sequence model end to end from each of the 6 DICOM series (16 slices drawn,
   lung window from the bundle): the predicted class, the share of sequence attention on the slices
   the radiologists marked as infected against the share of such slices; a montage per series (Fig. 6).
   Six patients: no accuracy claim.

Writes benchmarks/results/reproduce_att2.json and .md (to --out when --set changes a recipe).

    python benchmarks/reproduce_att2.py [--out DIR] [--set key=value (stage 1)] [--set2 key=value (stage 2)]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def train(config: str, run_dir: Path, overrides: list[str]) -> tuple[dict, float]:
    from chestdx.train.config import load_config
    from chestdx.train.run import fit

    cfg = load_config(ROOT / "configs" / config, overrides)
    started = time.time()
    fit(cfg, run_dir, progress=False)
    return cfg, time.time() - started


def slice_results(run_dir: Path, seconds: float) -> dict:
    from chestdx.evaluate.run import evaluate_bundle

    m = evaluate_bundle(run_dir / "model.pt", run_dir / "eval", n_boot=1000)
    test = m["test"]["at_0.5"]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    return {
        "test": {k: test[k] for k in ("auc", "accuracy", "sensitivity", "specificity", "f1")}
        | {"auc_ci": test["auc_ci"], "accuracy_ci": test["accuracy_ci"]},
        "test_at_validation_threshold": m["test"]["at_val_threshold"],
        "test_precision_recall_f1": m["test_precision_recall_f1"],
        "validation_auc": summary["validation"]["auc"],
        "shortcut_probe_auc_all_jpeg": m.get("shortcut_probe", {}).get("auc_all_jpeg"),
        "best_epoch": summary.get("best_epoch"), "seconds_per_epoch": summary["seconds_per_epoch"],
        "train_seconds": seconds,
    }


def ladnn_rows() -> dict:
    path = RESULTS / "reproduce_ladnn.json"
    if not path.is_file():
        return {}
    done = json.loads(path.read_text())
    return {name: {"test": done[name]["test"], "from": "benchmarks/results/reproduce_ladnn.json (seed ensembles)"}
            for name in ("baseline", "ladnn") if name in done}


def sequence_results(bundle: Path) -> dict:
    """Test sequences: metrics with CIs, attention peak on a lesion slice, attention mass on them."""
    import torch

    from chestdx.data.dataset import ManifestDataset, reader_for
    from chestdx.data.datasets import get_dataset
    from chestdx.data.sequences import lesion_slices
    from chestdx.data.transforms import build_pipeline
    from chestdx.evaluate.metrics import evaluate_binary, precision_recall_f1
    from chestdx.inference import Predictor

    predictor = Predictor(bundle)
    test = get_dataset(predictor.bundle["config"]["dataset"]).manifest().subset("test")
    load, sample = build_pipeline(predictor.bundle["preprocess"], train=False)
    data = ManifestDataset(test, predictor.heads, load, sample, cache="none",
                           read=reader_for("sequence", predictor.bundle["preprocess"]))
    probs, attention = [], []
    with torch.no_grad():
        for start in range(0, len(data), 16):
            x = torch.stack([data[i]["image"] for i in range(start, min(len(data), start + 16))])
            out = predictor.model(x)
            probs.append(torch.sigmoid(out["logits"]).numpy())
            attention.append(out["slice_attention"].numpy())
    prob, attention = np.concatenate(probs), np.concatenate(attention)
    y, _ = data.head_arrays(predictor.primary.name)
    threshold = predictor.threshold
    metrics = evaluate_binary(y, prob, data.patients, threshold, n_boot=1000)
    lesions = lesion_slices(test)
    positive = [k for k, s in enumerate(lesions) if s]
    peak_on = [int(np.argmax(attention[k]) in lesions[k]) for k in positive]
    mass = [float(attention[k][lesions[k]].sum()) for k in positive]
    at = metrics["at_val_threshold"]
    return {
        "n_test": int(len(y)), "n_positive": len(positive), "threshold_from_validation": threshold,
        "accuracy": at["accuracy"], "accuracy_ci": at["accuracy_ci"], "auc": at["auc"], "auc_ci": at["auc_ci"],
        "sensitivity": at["sensitivity"], "specificity": at["specificity"],
        "at_0.5": {k: metrics["at_0.5"][k] for k in ("accuracy", "accuracy_ci", "sensitivity", "specificity")},
        "precision_recall_f1": precision_recall_f1(y, prob >= threshold, predictor.bundle["classes"]),
        "attention_peak_on_lesion_rate": float(np.mean(peak_on)),
        "attention_mass_on_lesion_slices": float(np.mean(mass)),
        "lesion_share_of_slices": float(np.mean([len(lesions[k]) / attention.shape[1] for k in positive])),
        "note": "CIs by bootstrap over sequences; sequences of one split share slices, so the CIs are optimistic",
    }


def covid_ct_md_slices(bundle: Path) -> dict:
    """The stage-1 slice model on every second covid-ct-md slice: AUC of the slices the radiologists
    marked infected in the COVID series against every normal-series slice, and against the marked CAP
    slices; read through the file's VOI window or the lung window, with and without the lung box."""
    import pandas as pd
    import torch

    from chestdx.data.datasets import data_root
    from chestdx.data.io import read_image
    from chestdx.data.transforms import build_pipeline
    from chestdx.evaluate.metrics import bootstrap_ci
    from chestdx.inference import Predictor
    from sklearn.metrics import roc_auc_score

    folder = data_root() / "covid-ct-md"
    slices = pd.read_csv(folder / "slices.csv")
    slices = slices[slices["slice_index"] % 2 == 0].reset_index(drop=True)
    kind = slices["series"].str.split("/").str[1]
    covid = (kind == "covid") & (slices["infection"] == 1)
    cap = (kind == "cap") & (slices["infection"] == 1)
    normal = kind == "normal"
    predictor = Predictor(bundle)
    out = {"n_marked_covid": int(covid.sum()), "n_marked_cap": int(cap.sum()), "n_normal": int(normal.sum()),
           "note": "CIs by bootstrap over slices of 6 patients: optimistic; no accuracy claim"}
    for window in ("file_voi", "lung_window"):
        images = [read_image(folder / r.series / r.file, hu_window=(-600, 1500) if window == "lung_window" else None)
                  .to_gray() for r in slices.itertuples()]
        for crop in (False, True):
            load, sample = build_pipeline({**predictor.bundle["preprocess"], "lung_crop": crop}, train=False)
            probs = []
            with torch.no_grad():
                for k in range(0, len(images), 32):
                    x = torch.stack([torch.from_numpy(sample({"image": load({"image": g[None]})["image"]})["image"])
                                     for g in images[k:k + 32]])
                    probs.append(predictor.predict_tensor(x)[predictor.primary.name])
            p = np.concatenate(probs)
            row = {}
            for against, negative in (("normal", normal), ("cap", cap)):
                keep = (covid | negative).to_numpy()
                y = covid.to_numpy()[keep].astype(int)
                ci = bootstrap_ci(y, p[keep], np.arange(int(keep.sum())),
                                  lambda yy, pp: {"auc": roc_auc_score(yy, pp)}, n=1000)["auc"]
                row[f"covid_vs_{against}"] = {"auc": float(roc_auc_score(y, p[keep])), "auc_ci": ci}
            out[f"{window}{'_lung_box' if crop else ''}"] = row
    return out


def covid_ct_md(bundle: Path, out_dir: Path) -> list[dict]:
    """Each covid-ct-md series end to end from DICOM with the sequence model, and its montage."""
    import pandas as pd

    from chestdx.data.datasets import data_root
    from chestdx.explain.sequence import write_series_montage
    from chestdx.inference import Predictor

    folder = data_root() / "covid-ct-md"
    manifest = pd.read_csv(folder / "manifest.csv")
    slices = pd.read_csv(folder / "slices.csv")
    predictor = Predictor(bundle)
    rows = []
    for _, series in manifest.iterrows():
        started = time.time()
        result, shown, x = predictor.predict_series(folder / series["path"])
        labels = slices[slices["series"] == series["path"]].set_index("slice_index")["infection"]
        drawn = [s["index"] for s in result["slices"]]
        attention = np.array([s["attention"] for s in result["slices"]])
        marked = labels.reindex(drawn).to_numpy() if labels.notna().any() else None
        row = {"series": series["patient_id"], "label": series["label"], "predicted": result["prediction"],
               "p_covid": result["probabilities"]["covid"], "n_slices": int(series["n_slices"]),
               "drawn_slices": drawn, "attention": [round(float(a), 4) for a in attention],
               "seconds": round(time.time() - started, 2)}
        if marked is not None:
            flags = marked.astype(float) > 0.5
            row.update(attention_on_marked=float(attention[flags].sum()), marked_share=float(flags.mean()),
                       marked_drawn=int(flags.sum()))
        else:
            row.update(attention_on_marked=None, marked_share=None, marked_drawn=None)
        png = write_series_montage(predictor, result, shown, x, out_dir / f"{series['patient_id']}.png",
                                   marked=None if marked is None else marked.astype(float) > 0.5)
        row["montage"] = str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)
        rows.append(row)
    return rows


SEQUENCE_CONFIGS = {"bilstm": "att2_bilstm_covidct.yaml",  # the paper's Eq. 4: hidden states pooled
                    "bilstm_slice_values": "att2_bilstm_covidct_slice_values.yaml"}


def toy_sequences(seeds: int = 6) -> dict:
    """Where the attention goes when the answer is known: 8 x 8 toy slices, a bright square in 3 of 16
    slices of each positive (anywhere), a parameter-free slice embedding (mean, max), 200 steps; for
    the paper's pooling of hidden states and for pooling the slices, over `seeds` seeds."""
    sys.path.insert(0, str(ROOT))
    from tests.toy import train_toy_sequence_model

    out = {}
    for values in ("hidden", "slices"):
        runs = [train_toy_sequence_model(values, seed) for seed in range(seeds)]
        out[values] = {"accuracy": [r["accuracy"] for r in runs],
                       "attention_on_lesion": [round(r["attention_on_lesion"], 4) for r in runs],
                       "peak_on_lesion_rate": [r["peak_on_lesion_rate"] for r in runs],
                       "peak_positions": [r["peak_positions"] for r in runs]}
    return out


def markdown(result: dict) -> str:
    lines = ["# ResNet50-ATT2 and the Bi-LSTM sequence model: reproduction on this machine", "",
             f"Setting: {result['setting']['note']}", "",
             "## Slices: covid-ct test split (203 images), threshold 0.5, 95% CIs by patient bootstrap", "",
             "| model | test AUC [95% CI] | accuracy [95% CI] | sensitivity | specificity | F1 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, row in result["slices"].items():
        t = row["test"]
        lines.append(f"| {name} | {t['auc']:.3f} [{t['auc_ci'][0]:.3f}, {t['auc_ci'][1]:.3f}] | {t['accuracy']:.3f} "
                     f"[{t['accuracy_ci'][0]:.3f}, {t['accuracy_ci'][1]:.3f}] | {t['sensitivity']:.3f} | "
                     f"{t['specificity']:.3f} | {t['f1']:.3f} |")
    att2 = result["slices"]["att2_efficientnet_lite0"]
    lines += ["", "ResNet50-ATT2 (CPU backbone) per class at its validation threshold (paper Table III layout):", "",
              *prf_rows(att2["test_precision_recall_f1"])]
    md = att2["covid_ct_md_slices"]
    lines += ["", f"External: the slice model on every second covid-ct-md slice ({md['n_marked_covid']} marked COVID, "
              f"{md['n_marked_cap']} marked CAP, {md['n_normal']} normal-series slices); {md['note']}:", "",
              "| read as | AUC marked COVID vs normal [95% CI] | vs marked CAP [95% CI] |", "| --- | --- | --- |"]
    for key in ("file_voi", "file_voi_lung_box", "lung_window", "lung_window_lung_box"):
        a, b = md[key]["covid_vs_normal"], md[key]["covid_vs_cap"]
        lines.append(f"| {key.replace('_', ' ')} | {a['auc']:.3f} [{a['auc_ci'][0]:.3f}, {a['auc_ci'][1]:.3f}] | "
                     f"{b['auc']:.3f} [{b['auc_ci'][0]:.3f}, {b['auc_ci'][1]:.3f}] |")
    s = result["sequences"]["synthetic"]
    lines += ["", f"## Sequences: covid-ct-sequences test ({s['n_test']} sequences of 16 real slices, "
              f"{s['n_positive']} with a run of 3 COVID slices)", "",
              f"- accuracy {s['accuracy']:.3f} [{s['accuracy_ci'][0]:.3f}, {s['accuracy_ci'][1]:.3f}] at the "
              f"validation threshold {s['threshold_from_validation']:.3f}; AUC {s['auc']:.3f} "
              f"[{s['auc_ci'][0]:.3f}, {s['auc_ci'][1]:.3f}]",
              f"- attention peak on a COVID slice in {100 * s['attention_peak_on_lesion_rate']:.1f}% of the positive "
              f"sequences; attention mass on the COVID slices {s['attention_mass_on_lesion_slices']:.3f} "
              f"(their share of the slices: {s['lesion_share_of_slices']:.3f})", "",
              *prf_rows(s["precision_recall_f1"]), "",
              "## covid-ct-md: six real DICOM series end to end (no accuracy claim from six patients)", "",
              "| series | label | predicted | p(covid) | attention on marked slices | marked share of drawn slices |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in result["sequences"]["covid_ct_md"]:
        on = "-" if r["attention_on_marked"] is None else f"{r['attention_on_marked']:.3f}"
        share = "-" if r["marked_share"] is None else f"{r['marked_share']:.3f}"
        lines.append(f"| {r['series']} | {r['label']} | {r['predicted']} | {r['p_covid']:.3f} | {on} | {share} |")
    for name, v in result["sequences"]["variants"].items():
        s = v["synthetic"]
        lines += ["", f"### Variant `{v['config']}`", "",
                  f"- covid-ct-sequences test: accuracy {s['accuracy']:.3f} [{s['accuracy_ci'][0]:.3f}, "
                  f"{s['accuracy_ci'][1]:.3f}], AUC {s['auc']:.3f}; attention peak on a COVID slice "
                  f"{100 * s['attention_peak_on_lesion_rate']:.1f}%, attention mass on them "
                  f"{s['attention_mass_on_lesion_slices']:.3f}", "",
                  "| series | label | predicted | p(covid) | attention on marked slices | marked share |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in v["covid_ct_md"]:
            on = "-" if r["attention_on_marked"] is None else f"{r['attention_on_marked']:.3f}"
            share = "-" if r["marked_share"] is None else f"{r['marked_share']:.3f}"
            lines.append(f"| {r['series']} | {r['label']} | {r['predicted']} | {r['p_covid']:.3f} | {on} | {share} |")
    toy = result["sequences"]["toy"]
    lines += ["", "## Toy sequences: where does the attention go? (6 seeds, lesion in 3 of 16 slices)", "",
              "| pooled | accuracy (per seed) | attention on the lesion slices (per seed) |", "| --- | --- | --- |"]
    for values, t in toy.items():
        lines.append(f"| {values} | {', '.join(f'{a:.2f}' for a in t['accuracy'])} | "
                     f"{', '.join(f'{a:.2f}' for a in t['attention_on_lesion'])} |")
    lines += ["", "Montages (Fig. 6: slice attention maps weighted by the sequence attention, marked slices in red) "
              "are written beside the runs (`runs/reproduce_att2/<variant>/covid_ct_md/`).", ""]
    return "\n".join(lines)


def prf_rows(prf: dict) -> list[str]:
    rows = ["| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
    for name, c in [*prf["per_class"].items(), ("weighted average", prf["weighted"])]:
        rows.append(f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |")
    return rows


def main() -> None:
    from chestdx.utils import library_versions, write_json_atomic, write_text_atomic

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce_att2")
    parser.add_argument("--set", action="append", default=[], help="stage-1 config override")
    parser.add_argument("--set2", action="append", default=[], help="stage-2 config override")
    args = parser.parse_args()
    started = time.time()
    result = {"setting": {
        "note": "CPU (2 cores). Stage 1: EfficientNet-Lite0 ATT2 (ImageNet init; taps 112 x 14 x 14 and the final "
                "1280 x 7 x 7 map), 224 px, LA-DNN's augmentation (it beat the paper's on validation), Adam 5e-4, batch 32, class-weighted loss, one pass per epoch, at most 15 "
                "epochs, selected on validation AUC. Stage 2: Bi-LSTM (256 per direction) + soft attention, Adam(W) "
                "1e-4, weight decay 5e-3, batch 16, at most 50 epochs, patience 10, no augmentation (so the "
                "frozen extractor's embeddings are reused every epoch). No lung box (the classical lung mask fails on "
                "full-field DICOM slices; measured below).",
        "overrides_stage1": args.set, "overrides_stage2": args.set2, "cpu_cores": os.cpu_count(),
        "libraries": library_versions()}}
    _, seconds = train("att2_covidct.yaml", args.out / "att2", args.set)
    result["slices"] = {"att2_efficientnet_lite0": slice_results(args.out / "att2", seconds), **ladnn_rows()}
    print(json.dumps(result["slices"]["att2_efficientnet_lite0"]["test"]), file=sys.stderr)
    result["slices"]["att2_efficientnet_lite0"]["covid_ct_md_slices"] = covid_ct_md_slices(args.out / "att2" / "model.pt")
    stage1 = args.out / "att2" / "model.pt"
    variants = {}
    for name, config in SEQUENCE_CONFIGS.items():
        _, seconds = train(config, args.out / name, [f"model.pretrained={stage1}", *args.set2])
        synthetic = sequence_results(args.out / name / "model.pt")
        synthetic["train_seconds"] = seconds
        print(name, json.dumps({k: synthetic[k] for k in ("accuracy", "attention_peak_on_lesion_rate")}),
              file=sys.stderr)
        variants[name] = {"config": config, "synthetic": synthetic,
                          "covid_ct_md": covid_ct_md(args.out / name / "model.pt", args.out / name / "covid_ct_md")}
    paper = variants.pop("bilstm")
    result["sequences"] = {"synthetic": paper["synthetic"], "covid_ct_md": paper["covid_ct_md"], "config": paper["config"],
                           "variants": variants, "toy": toy_sequences()}
    result["seconds_total"] = time.time() - started
    out = args.out if (args.set or args.set2) else RESULTS
    write_json_atomic(out / "reproduce_att2.json", result)
    write_text_atomic(out / "reproduce_att2.md", markdown(result))
    print(f"results: {out / 'reproduce_att2.json'}", file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    from chestdx.errors import ChestDxError

    try:
        main()
    except ChestDxError as err:
        sys.exit(f"error: {err}")
