"""The `chestdx` command line: train, evaluate, predict, explain, evaluate-localization, export, serve, ...

Every user-facing failure (bad input file, missing data or weights) is printed as one line
naming the file and the problem, with a non-zero exit status and no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from chestdx.errors import ChestDxError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="chestdx: attention-guided diagnosis of chest X-ray and CT images (research use only).")
datasets_app = typer.Typer(no_args_is_help=True, help="List, describe and check datasets and manifests.")
app.add_typer(datasets_app, name="datasets")
from chestdx.serve.admin_cli import audit as audit_command, keys_app, users_app  # noqa: E402  (light: typer only)

app.add_typer(users_app, name="users")
app.add_typer(keys_app, name="keys")
app.command("audit")(audit_command)
console = Console()
err_console = Console(stderr=True)


@app.command()
def train(
    config: Path = typer.Option(..., "--config", "-c", help="experiment YAML, e.g. configs/ladnn_covidct.yaml"),
    run_dir: Path = typer.Option(None, "--run-dir", help="output folder (default runs/<config name>)"),
    set_: List[str] = typer.Option([], "--set", help="override, e.g. --set train.epochs=5"),
    install: bool = typer.Option(False, "--install", help="also install the model as the default for predict"),
    evaluate_after: bool = typer.Option(True, "--evaluate/--no-evaluate", help="evaluate on val/test afterwards"),
    folds: int = typer.Option(0, "--folds", min=0, help="K >= 3: patient-level K-fold cross-validation instead of "
                              "the dataset's split (fold k tests, fold k+1 selects); writes cv_summary.json"),
    group_by: str = typer.Option("patient", "--group-by", help="with --folds: what a fold keeps together: patient, "
                                 "or publication (figures cut from papers, e.g. covid-ct: one preprint per group)"),
):
    """Train a model (resumes from the run folder's last checkpoint if there is one)."""
    from chestdx.train.config import load_config
    from chestdx.train.run import fit, is_main_process

    cfg = load_config(config, set_)
    run_dir = run_dir or Path("runs") / cfg["name"]
    if folds:
        _cross_validate(cfg, run_dir, folds, install, group_by)
        return
    model_path = fit(cfg, run_dir, progress=sys.stderr.isatty())
    if not is_main_process():  # a DDP worker process: rank 0 reports
        return
    console.print(f"model: {model_path}")
    if install:
        _install(model_path)
    if evaluate_after:
        _evaluate(model_path, run_dir / "eval", None, cfg["evaluate"]["bootstrap"])


def _cross_validate(cfg: dict, run_dir: Path, folds: int, install: bool, group_by: str = "patient") -> None:
    from chestdx.train.cv import cross_validate

    if install:
        raise ChestDxError("--install takes a single model; cross-validation trains one per fold")
    summary = cross_validate(cfg, run_dir, folds, progress=sys.stderr.isatty(), n_boot=cfg["evaluate"]["bootstrap"],
                             group_by=group_by)
    if not summary:  # a DDP worker process: rank 0 reports
        return
    table = Table(title=f"{cfg['name']}: {folds}-fold cross-validation by {group_by}, test folds, threshold 0.5")
    metrics = list(summary["mean"])
    for col in ["fold", *metrics]:
        table.add_column(col)
    for k, fold in enumerate(summary["folds"]):
        table.add_row(str(k), *(f"{fold[m]:.3f}" for m in metrics))
    table.add_row("mean ± sd", *(f"{summary['mean'][m]:.3f} ± {summary['sd'][m]:.3f}" for m in metrics))
    # Piped or logged output gets 80 columns by default, which squeezes the metric names.
    (console if console.is_terminal else Console(width=max(console.width, 130))).print(table)
    console.print(f"summary: {run_dir / 'cv_summary.json'}")


@app.command()
def evaluate(
    checkpoint: Path = typer.Option(None, "--checkpoint", help="model bundle (default: the installed model)"),
    out: Path = typer.Option(Path("runs/eval"), "--out", help="report folder"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="named dataset (default: the model's)"),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="bootstrap resamples for the 95% CIs"),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="an external set instead: a CSV of images "
                                            "or series (path, label, patient_id, optional source)"),
    label_map: List[str] = typer.Option([], "--map", help="with --manifest: LABEL=CLASS onto the model's classes, "
                                        "e.g. --map cap=noncovid --map normal=noncovid"),
    slice_labels: Optional[Path] = typer.Option(None, "--slice-labels", help="with --manifest: per-slice labels "
                                                "(series, file, infection columns)"),
    slice_label_column: str = typer.Option("infection", "--slice-label-column"),
    aggregate: str = typer.Option("topk", "--aggregate", help="series score from its slices: mean, max or topk"),
    top_k: int = typer.Option(5, "--top-k", min=1, help="slices averaged by --aggregate topk"),
    positive: Optional[str] = typer.Option(None, "--positive", help="class scored against the rest "
                                           "(default: covid, else the last class)"),
    backend: str = typer.Option("auto", "--backend", help="auto (ONNX Runtime when a current export lies "
                                "beside the bundle), onnx or pytorch"),
    workers: int = typer.Option(0, "--workers", min=0, help="decoding worker processes (0: in this process)"),
    attention_slices: int = typer.Option(24, "--attention-slices", min=0, help="with --manifest: heat maps on "
                                         "this many positive and negative slices, scored inside the lungs (0: none)"),
):
    """Evaluate on the dataset's val and test splits, or on an external --manifest; write metrics.json,
    figures and a report."""
    if manifest is None:
        extra = [flag for flag, used in (("--map", label_map), ("--slice-labels", slice_labels),
                                         ("--positive", positive)) if used]
        if extra:
            raise ChestDxError(f"{', '.join(extra)}: only with --manifest")
        _evaluate(checkpoint or _default_model(), out, dataset, bootstrap)
        return
    from chestdx.evaluate.external import evaluate_external

    m = evaluate_external(checkpoint or _default_model(), manifest, out, label_map, slice_labels, slice_label_column,
                          aggregate, top_k, positive, n_boot=bootstrap, workers=workers,
                          attention_slices=attention_slices, backend=backend)
    console.print(f"external set ({m['n_rows']} rows, {m['n_images']} images, {m['images_per_second']:.1f} "
                  f"images/s on {m['backend']}): not used in training or model selection")
    for level in ("slices", "patients"):
        entry = (m.get(level) or {}).get("all_negatives")
        if entry and entry.get("auc") is not None:
            console.print(f"{level}: AUC {entry['auc']:.3f} [{entry['auc_ci'][0]:.3f}, {entry['auc_ci'][1]:.3f}] "
                          f"({entry['n']}, {entry['n_positive']} positive)")
    if m["errors"]:
        err_console.print(f"{len(m['errors'])} row(s) could not be read; see the report")
    console.print(f"report: {Path(out) / 'report.html'}")


def _evaluate(model_path, out, dataset, bootstrap):
    from chestdx.evaluate.run import evaluate_bundle

    metrics = evaluate_bundle(model_path, out, dataset=dataset, n_boot=bootstrap)
    if metrics["task"] == "multilabel":
        t = metrics["test"]
        ci = t.get("macro_auc_ci") or [None, None]
        span = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else ""
        console.print(f"test mean AUC over {len(t['estimable_labels'])} estimable labels {t['macro_auc']:.3f}{span}  "
                      f"macro sensitivity {t['macro_sensitivity']:.3f}  macro specificity {t['macro_specificity']:.3f}")
        console.print(f"report: {Path(out) / 'report.html'}")
        return
    if metrics["task"] == "multiclass":
        t = metrics["test"]
        console.print(f"test accuracy {t['accuracy']:.3f} [{t['accuracy_ci'][0]:.3f}, {t['accuracy_ci'][1]:.3f}]  "
                      f"macro AUC {t['macro_auc']:.3f}  macro F1 {t['macro_f1']:.3f}  "
                      f"macro sensitivity {t['macro_sensitivity']:.3f}  macro specificity {t['macro_specificity']:.3f}")
        console.print(f"report: {Path(out) / 'report.html'}")
        return
    t = metrics["test"]["at_0.5"]
    console.print(f"test AUC {t['auc']:.3f} [{t['auc_ci'][0]:.3f}, {t['auc_ci'][1]:.3f}]  accuracy {t['accuracy']:.3f}  "
                  f"sensitivity {t['sensitivity']:.3f}  specificity {t['specificity']:.3f}  F1 {t['f1']:.3f}")
    console.print(f"report: {Path(out) / 'report.html'}")


@app.command()
def calibrate(
    checkpoint: Path = typer.Option(None, "--checkpoint", help="model bundle (default: the installed model)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="named dataset whose validation split is used "
                                          "(default: the model's)"),
):
    """Fit the temperature on the validation split and store it in the bundle (training does this itself;
    this is for bundles trained before it did). Thresholds move with it, so decisions stay the same."""
    from chestdx.evaluate.run import calibrate_bundle

    path = checkpoint or _default_model()
    c = calibrate_bundle(path, dataset)
    before, after = c["validation_before"], c["validation_after"]
    console.print(f"temperature {c['temperature']:.3f} on {before['n']} validation images: ECE {before['ece']:.3f} -> "
                  f"{after['ece']:.3f}, Brier {before['brier']:.3f} -> {after['brier']:.3f}; stored in {path}")


@app.command()
def predict(
    inputs: List[Path] = typer.Argument(..., help="PNG/JPEG/DICOM files or folders"),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="model bundle (default: the installed model)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write .csv or .json here instead of printing"),
    montage: Optional[Path] = typer.Option(None, "--montage",
                                           help="sequence and 3D models: write each series' attention montage here "
                                                "(3D: T(A) and Grad-CAM as NIfTI and axial/coronal PNG montages)"),
    backend: str = typer.Option("auto", "--backend", help="auto (ONNX Runtime when a current export lies "
                                "beside the bundle), onnx or pytorch"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="images per forward pass (2D models; "
                                             "default 4, chestdx.inference.BATCH_SIZE)"),
    workers: int = typer.Option(0, "--workers", min=0, help="decoding processes (2D; 0: this one)"),
    unfamiliar: str = typer.Option("refuse", "--unfamiliar", help="images far from the model's training images "
                                   "(input check distance over its limit): refuse, or predict them marked "
                                   "unfamiliar (2D)"),
):
    """Predict class (and lesion) probabilities for image files, or per series for a sequence or 3D model
    (each input one series: a DICOM folder, a NIfTI file or a folder of slice images). An image's row
    says how far it lies from the training images (input_distance, input_limit, unfamiliar)."""
    from chestdx.data.input_check import UNFAMILIAR
    from chestdx.inference import BATCH_SIZE, expand_inputs, predictor_for, series_source

    if unfamiliar not in ("refuse", "predict"):
        raise ChestDxError(f"--unfamiliar {unfamiliar!r}: use refuse or predict")
    batch_size = batch_size or BATCH_SIZE
    predictor = predictor_for(checkpoint or _default_model(), backend, batch=batch_size)
    series = predictor.takes_series
    if series and unfamiliar == "predict":
        raise ChestDxError("--unfamiliar predict is for 2D image models; sequence and 3D models have no input check")
    if montage and not series:
        raise ChestDxError("--montage is for sequence and 3D models; use chestdx explain for images")
    files = expand_inputs(inputs, series=series)
    if not files:
        raise ChestDxError("no image files found in the given inputs")
    rows, failed, names = [], 0, set()
    unlike = 0  # refused by the input check's distance rule alone

    def report(message):
        nonlocal failed
        failed += 1
        err_console.print(f"error: {message}", highlight=False, markup=False, soft_wrap=True)

    if not series:  # batched, decoded in worker processes
        for path, result, error in predictor.predict_files(files, batch_size=batch_size, workers=workers,
                                                           refuse_unfamiliar=unfamiliar == "refuse"):
            if error is None:
                rows.append({"path": str(path), **result})
            else:
                unlike += error.endswith(UNFAMILIAR)  # the distance rule's reason ends so
                report(error)
    for path in files if series else ():
        try:
            with series_source(path) as source:
                rows.append({"path": str(path), **_predict_series(predictor, source, path, montage, names)})
        except ChestDxError as err:
            report(err)
    if out:
        _write_predictions(rows, out)
        console.print(f"{len(rows)} prediction(s) written to {out}")
    elif rows:
        print(json.dumps(rows, indent=2))
    marked = sum(bool(r.get("unfamiliar")) for r in rows)
    if unlike:
        err_console.print(f"{unlike} of {len(files)} image(s) refused as unlike the model's training images; "
                          "--unfamiliar predict gives their answers, marked unfamiliar", highlight=False, soft_wrap=True)
    if marked:
        err_console.print(f"{marked} of {len(rows)} prediction(s) are of images unlike the model's training "
                          "images (unfamiliar: true): their answers are not reliable", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(code=2)


def _predict_series(predictor, source: Path, path: Path, montage: Path | None, names: set) -> dict:
    """One series' row; with `montage`, its explanations written under a name from `path`."""
    if not montage:
        return predictor.predict_source(source)
    name = _safe_stem(path)
    name = name if name not in names else f"{name}-{len(names)}"  # two series folders of one name
    names.add(name)
    if predictor.sample == "volume":
        from chestdx.explain.volume import explain_volume

        return explain_volume(predictor, source, montage, name)
    from chestdx.explain.sequence import write_series_montage

    result, shown, x = predictor.predict_series(source)
    result["montage"] = str(write_series_montage(predictor, result, shown, x, montage / f"{name}.png"))
    return result


def _safe_stem(path: Path) -> str:
    name = path.name[:-7] if path.name.endswith(".nii.gz") else path.stem
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "series"


VOLUME_FIELDS = ("infection_ratio", "infection_ratio_source", "attention_in_lungs")
DISTANCE_FIELDS = ("input_distance", "input_limit", "unfamiliar")  # an image's distance from the training images


def _write_predictions(rows, out: Path):
    from chestdx.utils import write_json_atomic, write_text_atomic

    if out.suffix.lower() == ".json":
        write_json_atomic(out, rows)
        return
    import pandas as pd

    flat = []
    for r in rows:
        prediction = r["prediction"]
        item = {"path": r["path"], "prediction": "|".join(prediction) if isinstance(prediction, list) else prediction,
                "threshold": r["threshold"] if not isinstance(r["threshold"], dict) else None}
        item.update({f"p_{k}": v for k, v in r["probabilities"].items()})
        for key, value in r.items():  # the other heads' probabilities (e.g. LA-DNN's lesions)
            if key not in ("path", "probabilities", "prediction", "threshold", "explanations") and isinstance(value, dict):
                item.update({f"p_{k}": v for k, v in value.items()})
        for key in VOLUME_FIELDS + DISTANCE_FIELDS:  # a 3D model's infection ratio and lung attention; distances
            if key in r:
                item[key] = r[key]
        flat.append(item)
    write_text_atomic(out, pd.DataFrame(flat).to_csv(index=False, float_format="%.5f"))


@app.command()
def explain(
    inputs: List[Path] = typer.Argument(None, help="PNG/JPEG/DICOM files or folders"),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="model bundle (default: the installed model)"),
    method: str = typer.Option("gradcam++", "--method", "-m", help="native, cam, gradcam, gradcam++, scorecam, layercam"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="or take images from a named dataset's split"),
    split: str = typer.Option("test", "--split", help="with --dataset: the split"),
    limit: int = typer.Option(4, "--limit", help="with --dataset: how many images"),
    target: List[str] = typer.Option(["predicted"], "--target", "-t",
                                     help="class or lesion name, 'predicted', 'classes', 'lesions' or 'all'; repeatable"),
    threshold: str = typer.Option("otsu", "--threshold", help="mask threshold: 'otsu' or a fraction of the maximum"),
    out: Path = typer.Option(Path("runs/explain"), "--out", help="output folder (overlays, maps, masks, gallery.html)"),
):
    """Heat maps per image and target: overlay PNG, raw .npy, mask PNG, box JSON and gallery.html."""
    from chestdx.explain.run import explain_files
    from chestdx.inference import expand_inputs

    files = expand_inputs(inputs or [])
    if dataset:
        from chestdx.data.datasets import get_dataset

        files += get_dataset(dataset).manifest().subset(split).paths()[:limit]
    if not files:
        raise ChestDxError("no image files found in the given inputs (give files, folders or --dataset)")
    failed = []

    def report(err):
        failed.append(err)
        err_console.print(f"error: {err}", highlight=False, markup=False, soft_wrap=True)

    records = explain_files(checkpoint or _default_model(), files, out, method, target, _threshold(threshold), report)
    console.print(f"{len(records)} map(s) for {len(files) - len(failed)} image(s); gallery: {out / 'gallery.html'}")
    if failed:
        raise typer.Exit(code=2)


def _threshold(value: str):
    if value == "otsu":
        return value
    try:
        level = float(value)
    except ValueError:
        level = -1.0
    if not 0 < level < 1:
        raise ChestDxError(f"--threshold must be 'otsu' or a number between 0 and 1, got {value!r}")
    return level


@app.command("evaluate-localization")
def evaluate_localization(
    manifest: Path = typer.Argument(..., help="manifest CSV (path, label, patient_id, split, ...)"),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="model bundle (default: the installed model)"),
    method: str = typer.Option("gradcam++", "--method", "-m"),
    target: str = typer.Option("predicted", "--target", "-t"),
    split: str = typer.Option("test", "--split", help="manifest split to score ('' for all rows)"),
    boxes: Optional[Path] = typer.Option(None, "--boxes", help="CSV of reference boxes: path, x, y, w, h"),
    mask_column: Optional[str] = typer.Option(None, "--mask-column", help="manifest column with reference masks"),
    lungs: Optional[str] = typer.Option(None, "--lungs", help="manifest column of lung masks, or 'ct' (classical)"),
    threshold: str = typer.Option("0.5", "--threshold", help="'otsu' or a fraction of the maximum (MAG-SD: 0.5)"),
    limit: int = typer.Option(0, "--limit", help="score only the first N rows (0: all)"),
    out: Path = typer.Option(Path("runs/localization"), "--out"),
):
    """IoU, pointing game and energy inside boxes/masks (and lungs), per class with 95% CIs."""
    from chestdx.explain.run import evaluate_localization as run

    if not (boxes or mask_column or lungs):
        raise ChestDxError("give at least one reference: --boxes, --mask-column or --lungs")
    result = run(checkpoint or _default_model(), manifest, out, method, target, split or None, boxes, mask_column,
                 lungs, _threshold(threshold), limit)
    table = Table(title=f"localization: {result['method']} ({result['n_images']} images)")
    keys = sorted({k for scores in result["by_class"].values() for k in scores})
    for col in ("class", *keys):
        table.add_column(col)
    for name, scores in result["by_class"].items():
        table.add_row(name, *[_mean_ci(scores.get(k)) for k in keys])
    console.print(table)
    console.print(f"written: {out / 'localization.json'}")


def _mean_ci(s) -> str:
    if not s or s["mean"] is None:
        return "-"
    return f"{s['mean']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]"


@app.command()
def export(
    checkpoint: Path = typer.Option(None, "--checkpoint", help="model bundle (default: the installed model)"),
    format_: str = typer.Option("onnx", "--format", help="export format (onnx)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output .onnx path (default: beside the checkpoint)"),
    verify: List[Path] = typer.Option([], "--verify", help="images on which to compare ONNX with PyTorch"),
):
    """Export to ONNX (+ a .json of classes, preprocessing and threshold beside it)."""
    from chestdx.export import export_onnx

    if format_.lower() != "onnx":
        raise ChestDxError(f"unsupported export format {format_!r}; supported: onnx")
    checkpoint = checkpoint or _default_model()
    path = export_onnx(checkpoint, out)
    console.print(f"ONNX model: {path}\nmetadata: {path.with_suffix('.json')}")
    if verify:
        import torch

        from chestdx.data.io import read_image
        from chestdx.inference import Predictor, expand_inputs

        torch_p, onnx_p = Predictor(checkpoint), Predictor(path)
        worst = 0.0
        for image in expand_inputs(verify):
            x = torch_p.preprocess(read_image(image, hu_window=torch_p.hu_window).to_gray())
            with torch.no_grad():
                a, b = torch_p.model(x), onnx_p.model(x)
            worst = max(worst, *(float((a[k] - b[k]).abs().max()) for k in b))
        console.print(f"largest |ONNX - PyTorch| output difference: {worst:.2e}")
        if worst > 1e-4:
            raise ChestDxError(f"ONNX outputs differ from PyTorch by {worst:.2e} (> 1e-4)")


@app.command()
def serve(
    models_dir: Path = typer.Option(None, "--models", help="folder of *.pt bundles and/or *.onnx exports "
                                    "(default: $CHESTDX_HOME/models)"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    db: Optional[str] = typer.Option(None, "--db", help="SQLAlchemy URL (default: sqlite:///$CHESTDX_HOME/studies.db; "
                                     "PostgreSQL: postgresql+psycopg://user@host/dbname)"),
    store_images: bool = typer.Option(False, "--store-images", help="keep de-identified uploads in the database"),
    max_upload_mb: float = typer.Option(50.0, "--max-upload-mb"),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="largest image accepted (default: the "
                                             "command line's limit, chestdx.data.io.MAX_PIXELS)"),
    workers: int = typer.Option(1, "--workers", help="uvicorn worker processes"),
    no_auth: bool = typer.Option(False, "--no-auth", help="no login or API key (only with a loopback --host)"),
    cors: List[str] = typer.Option([], "--cors-origin", help="a web origin allowed to call the API from a browser"),
    secure_cookies: bool = typer.Option(False, "--secure-cookies", help="mark the session cookie Secure even "
                                        "when requests reach the service over plain HTTP (TLS ends at a proxy)"),
    public_origin: List[str] = typer.Option([], "--public-origin", help="the page's address as browsers see it "
                                            "behind a proxy, e.g. https://chestdx.hospital.org (https: Secure cookie)"),
    forwarded_allow_ips: Optional[str] = typer.Option(None, "--forwarded-allow-ips", help="proxies whose "
                                                      "X-Forwarded-* headers are trusted (default 127.0.0.1)"),
    max_sync_s: float = typer.Option(10.0, "--max-sync-seconds", min=0, help="a volume upload is answered at "
                                     "once if 2 x the model's warm-up pass fits in this; else it becomes a job "
                                     "(0: every volume is a job)"),
    job_workers: int = typer.Option(1, "--job-workers", min=1, help="volume jobs run at once per service process"),
    job_queue: int = typer.Option(4, "--job-queue", min=0, help="volume jobs waiting per process; one more gets "
                                  "503 with Retry-After"),
):
    """Start the web page and REST API (OpenAPI docs at /docs, after logging in)."""
    import os

    import uvicorn

    from chestdx.data.io import MAX_PIXELS
    from chestdx.settings import home as chestdx_home

    if no_auth and host not in ("127.0.0.1", "localhost", "::1"):
        raise ChestDxError(f"--no-auth serves everyone who reaches {host}; it is allowed only with --host 127.0.0.1")
    home = chestdx_home()
    os.environ["CHESTDX_SERVE_MODELS"] = str(models_dir or home / "models")
    os.environ["CHESTDX_SERVE_DB"] = db or f"sqlite:///{home / 'studies.db'}"
    os.environ["CHESTDX_SERVE_STORE_IMAGES"] = "1" if store_images else "0"
    os.environ["CHESTDX_SERVE_MAX_MB"] = str(max_upload_mb)
    os.environ["CHESTDX_SERVE_MAX_PIXELS"] = str(max_pixels or MAX_PIXELS)
    os.environ["CHESTDX_SERVE_AUTH"] = "0" if no_auth else "1"
    os.environ["CHESTDX_SERVE_CORS"] = ",".join(cors)
    os.environ["CHESTDX_SERVE_SECURE_COOKIES"] = "1" if secure_cookies else "0"
    os.environ["CHESTDX_SERVE_PUBLIC_ORIGINS"] = ",".join(o.rstrip("/") for o in public_origin)
    os.environ["CHESTDX_SERVE_MAX_SYNC_S"] = str(max_sync_s)
    os.environ["CHESTDX_SERVE_JOB_WORKERS"] = str(job_workers)
    os.environ["CHESTDX_SERVE_JOB_QUEUE"] = str(job_queue)
    from chestdx.serve.app import app_from_env, deid_key

    os.environ["CHESTDX_DEID_KEY"] = deid_key(home)  # one UID mapping for every worker

    service = app_from_env()  # fail here, with one line, if the models or the database are unusable
    if not no_auth:
        _first_admin(service.state.accounts)
    console.print(f"chestdx service: http://{host}:{port}/  (API docs: http://{host}:{port}/docs)")
    uvicorn.run("chestdx.serve.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="warning", proxy_headers=True, forwarded_allow_ips=forwarded_allow_ips)


def _first_admin(accounts) -> None:
    """A service with no users gets one administrator, its password printed once, so the page can be used."""
    import os
    import secrets

    if accounts.users():
        return
    from sqlalchemy.exc import IntegrityError

    password = secrets.token_urlsafe(12)
    try:
        accounts.add_user("admin", password, "default", admin=True)
    except (ChestDxError, IntegrityError):  # another process starting on the same database made it first
        return
    accounts.db.audit("cli", "user_added", detail="admin (default, admin): first start")
    if sys.stdout.isatty():  # a person at a terminal reads it once; logs of a daemon must not keep it
        console.print(f"first start: created the user [bold]admin[/] with password [bold]{password}[/] "
                      "(shown once; add users with `chestdx users add`)", markup=True)
        return
    from chestdx.settings import home

    path = home() / "first-admin-password"
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(password + "\n")
    console.print(f"first start: created the user admin; its password is in {path} (readable by this user only)")


@app.command("input-reference")
def input_reference(
    checkpoint: Path = typer.Argument(..., help="model bundle (.pt) to add the reference to"),
    dataset: str = typer.Option(None, "--dataset", help="named dataset whose training split the model saw"),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="or a manifest CSV (its train split)"),
    max_images: int = typer.Option(2000, "--max-images"),
):
    """Record the training images' statistics in a bundle, so that inputs far from them (a photograph,
    another body part, a blank) are refused instead of diagnosed. Training does this itself."""
    from chestdx.data.input_check import add_input_reference, fit_manifest_reference
    from chestdx.inference import Predictor

    if (dataset is None) == (manifest is None):
        raise ChestDxError("give --dataset or --manifest (the model's training data)")
    if manifest is not None:
        from chestdx.data.manifest import Manifest

        table = Manifest.from_csv(manifest)
    else:
        from chestdx.data.datasets import get_dataset

        table = get_dataset(dataset).manifest()
    predictor = Predictor(checkpoint)
    if predictor.sample != "image":
        raise ChestDxError(f"{checkpoint}: a {predictor.sample} model; the input check is for single images")
    with console.status("reading the training images"):
        reference = fit_manifest_reference(table, modality=predictor.modality, max_images=max_images,
                                           hu_window=predictor.hu_window)
    add_input_reference(checkpoint, reference=reference)
    console.print(f"{checkpoint}: input reference of {reference.get('n_images', '?')} training images added "
                  f"(distance limit {reference.get('limit', float('nan')):.2f})")


@app.command()
def models():
    """List the model registry and the backbones."""
    from chestdx.models import BACKBONES, get_entry, list_models

    table = Table(title="chestdx models")
    for col in ("name", "modality", "sample", "heads (task: labels; * primary)", "method", "description"):
        table.add_column(col)
    for name in list_models():
        e = get_entry(name)
        heads = "\n".join(f"{'*' if h.name == e.primary else ''}{h.name} ({h.task}): {', '.join(h.labels)}"
                          for h in e.heads)
        table.add_row(name, e.modality, f"{e.sample} {e.spatial_dims}D", heads, e.method, e.description)
    console.print(table)
    console.print("backbones: " + ", ".join(f"{k} ({v.timm_name})" for k, v in sorted(BACKBONES.items())))
    from chestdx.settings import default_model_path

    path = default_model_path()
    console.print(f"installed default model: {path if path.exists() else 'none (run make demo)'}")


@datasets_app.command("list")
def datasets_list():
    """Named datasets and whether they are present."""
    from chestdx.data.datasets import DATASETS

    table = Table(title="datasets")
    for col in ("name", "modality", "present", "folder", "description"):
        table.add_column(col)
    for info in DATASETS.values():
        table.add_row(info.name, info.modality, "yes" if info.present() else "no",
                      str(info.folder()), info.description)
    console.print(table)


@datasets_app.command("describe")
def datasets_describe(name: str):
    """Counts per split and label, patients, and where the original comes from."""
    from chestdx.data.datasets import get_dataset

    info = get_dataset(name)
    frame = info.manifest().frame
    console.print(f"[bold]{info.name}[/bold]: {info.description}\nfolder: {info.folder()}\nsource: {info.source}")
    counts = frame.groupby(["split", "label"]).size().unstack(fill_value=0)
    counts["all"] = counts.sum(axis=1)
    console.print(counts.to_string())
    labels = [c for c in getattr(info, "extra_labels", ()) if c in frame.columns]
    if labels:  # a multi-label dataset: positives per label and split (empty cells are unknown)
        import pandas as pd

        values = frame[labels].apply(pd.to_numeric, errors="coerce")
        console.print("positives per label:\n" + values.groupby(frame["split"]).sum().astype(int).T.to_string())
    console.print(f"patients: {frame['patient_id'].nunique()}, images: {len(frame)}")


@datasets_app.command("check")
def datasets_check(manifest: Path, label_column: str = typer.Option("label", "--label-column"),
                   read_images: bool = typer.Option(True, "--read-images/--no-read-images")):
    """Check a manifest: columns, labels, patient leakage across splits, and every image readable."""
    from chestdx.data.io import read_image
    from chestdx.data.manifest import Manifest

    m = Manifest.from_csv(manifest, label_column=label_column)
    bad = 0
    if read_images:
        from rich.progress import track

        for path in track(m.paths(), description="Reading images", console=err_console):
            try:
                read_image(path)
            except ChestDxError as err:
                bad += 1
                err_console.print(f"error: {err}", highlight=False, markup=False)
    console.print(f"{manifest}: {len(m)} rows, {m.frame['patient_id'].nunique()} patients, classes {list(m.classes)}, "
                  f"no patient in two splits, {bad} unreadable image(s)")
    if bad:
        raise typer.Exit(code=2)


def _default_model() -> Path:
    from chestdx.settings import default_model_path

    path = default_model_path()
    if not path.exists():
        raise ChestDxError(f"no model given and none installed at {path}; run `make demo` or pass --checkpoint")
    return path


def _install(model_path: Path) -> None:
    import shutil

    from chestdx.settings import default_model_path
    from chestdx.utils import atomic_path

    target = default_model_path()
    with atomic_path(target) as tmp:
        shutil.copyfile(model_path, tmp)
    console.print(f"installed as the default model: {target}")


@app.command()
def install(checkpoint: Path = typer.Argument(..., help="model bundle to use by default")):
    """Make a model bundle the default for predict/evaluate."""
    from chestdx.models.bundle import load_bundle

    load_bundle(checkpoint)  # refuse to install something unusable
    _install(checkpoint)


def main() -> None:
    try:
        # Without standalone mode click returns the exit code of typer.Exit instead of exiting.
        code = app(standalone_mode=False)
    except ChestDxError as err:
        err_console.print(f"error: {err}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # usage errors from typer's click (a vendored copy in recent typer)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `chestdx datasets` alone: the help was printed
            sys.exit(0)
        if type(exc).__name__ in ("UsageError", "BadParameter", "NoSuchOption", "MissingParameter",
                                  "BadOptionUsage", "BadArgumentUsage", "ClickException", "FileError"):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
