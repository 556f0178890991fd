"""End to end through the installed `chestdx` command, on a small real subset of covid-ct."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from tests.test_io import make_dicom

SMALL = ["--set", "train.limit_per_split=24", "--set", "train.batch_size=8", "--set", "preprocess.size=64",
         "--set", "evaluate.bootstrap=50", "--set", "train.ensemble=1"]
CHESTDX = [sys.executable, "-m", "chestdx.cli"]


def run(args, env_home, check=True):
    import os

    env = dict(os.environ, CHESTDX_HOME=str(env_home))
    proc = subprocess.run(CHESTDX + args, capture_output=True, text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"chestdx {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory, covid_ct_dir):
    """One epoch on 24 real training images, then a resumed second epoch."""
    root = tmp_path_factory.mktemp("cli")
    home, run_dir = root / "home", root / "run"
    run(["train", "--config", "configs/ladnn_covidct.yaml", "--run-dir", str(run_dir), "--no-evaluate",
         "--set", "train.epochs=1", *SMALL], home)
    first = (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime
    run(["train", "--config", "configs/ladnn_covidct.yaml", "--run-dir", str(run_dir), "--no-evaluate", "--install",
         "--set", "train.epochs=2", *SMALL], home)
    return {"home": home, "run": run_dir, "first_ckpt_mtime": first}


def test_training_resumes_from_the_last_checkpoint(trained):
    logs = sorted((trained["run"] / "logs").glob("version_*/metrics.csv"))
    assert len(logs) == 2  # one log per invocation; the first is kept
    log = pd.concat([pd.read_csv(p) for p in logs])
    epochs = sorted(log["epoch"].dropna().unique())
    assert epochs == [0, 1]
    # Each epoch validated once: the second call resumed at epoch 1 instead of starting over.
    assert log["val_auc"].notna().sum() == 2
    summary = json.loads((trained["run"] / "train_summary.json").read_text())
    assert summary["registry_name"] == "ladnn" and len(summary["data_fingerprint"]) == 33
    assert set(summary["validation"]) >= {"auc", "thresholds"} and len(summary["thresholds"]["diagnosis"]) == 1


def test_predict_finds_the_installed_model(trained, covid_ct_dir, tmp_path):
    covid = sorted((covid_ct_dir / "images" / "covid").glob("*.png"))[0]
    proc = run(["predict", str(covid)], trained["home"])
    rows = json.loads(proc.stdout)
    assert rows[0]["path"] == str(covid)
    probs = rows[0]["probabilities"]
    assert probs["covid"] + probs["noncovid"] == pytest.approx(1)
    assert set(rows[0]["lesions"]) == {"GGO", "Csld", "CrPa", "AirBr", "InSepThi"}


def test_predict_dicom_and_16bit_png_to_csv(trained, covid_ct_dir, tmp_path):
    src = sorted((covid_ct_dir / "images" / "covid").glob("*.png"))[1]
    grey = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
    png16 = tmp_path / "slice16.png"
    cv2.imwrite(str(png16), grey.astype(np.uint16) * 257)
    # A figure saved as DICOM (modality OT): no Hounsfield units, so no CT window applies.
    dcm = make_dicom(tmp_path / "slice.dcm", grey.astype(np.uint16) * 16, modality="OT")
    out = tmp_path / "pred.csv"
    run(["predict", str(png16), str(dcm), "--out", str(out)], trained["home"])
    frame = pd.read_csv(out)
    assert len(frame) == 2 and {"p_covid", "p_GGO", "prediction"} <= set(frame.columns)
    # The same pixels through 16-bit PNG and DICOM give the same answer.
    assert frame["p_covid"][0] == pytest.approx(frame["p_covid"][1], abs=1e-3)


@pytest.mark.parametrize("name,content,reason", [
    ("corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\x01" * 64, "corrupt"),
    ("empty.png", b"", "empty file"),
    ("notes.txt", b"hello radiologist\n", "not a supported image"),
    ("tiny.png", None, "too small"),
])
def test_bad_input_is_one_clear_line(trained, tmp_path, name, content, reason):
    path = tmp_path / name
    if content is None:
        cv2.imwrite(str(path), np.zeros((1, 1), np.uint8))
    else:
        path.write_bytes(content)
    proc = run(["predict", str(path)], trained["home"], check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and reason in lines[0]


def test_evaluate_writes_report_and_figures(trained, tmp_path):
    out = tmp_path / "eval"
    run(["evaluate", "--out", str(out), "--bootstrap", "50"], trained["home"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_test"] == 203
    auc_ci = metrics["test"]["at_0.5"]["auc_ci"]
    assert auc_ci[0] <= metrics["test"]["at_0.5"]["auc"] <= auc_ci[1]
    for name in ("roc.png", "pr.png", "confusion.png", "report.md", "report.html", "predictions_test.csv"):
        assert (out / name).stat().st_size > 0
    assert "Shortcut check" in (out / "report.md").read_text()
    assert len(pd.read_csv(out / "predictions_test.csv")) == 203


def test_datasets_and_models_commands(tmp_path, covid_ct_dir):
    assert "covid-ct" in run(["datasets", "list"], tmp_path).stdout
    assert "425" in run(["datasets", "describe", "covid-ct"], tmp_path).stdout
    ok = run(["datasets", "check", str(covid_ct_dir / "manifest.csv"), "--no-read-images"], tmp_path)
    assert "no patient in two splits" in ok.stdout
    bad = tmp_path / "leak.csv"
    bad.write_text("path,label,patient_id,split\na.png,covid,p1,train\nb.png,covid,p1,test\n")
    proc = run(["datasets", "check", str(bad)], tmp_path, check=False)
    assert proc.returncode == 2 and "p1" in proc.stderr and "Traceback" not in proc.stderr
    assert "ladnn" in run(["models"], tmp_path).stdout


def test_explain_writes_overlays_for_covid_and_each_lesion_head(trained, covid_ct_dir, tmp_path):
    test_rows = pd.read_csv(covid_ct_dir / "manifest.csv").query("split == 'test'").head(2)
    images = [str(covid_ct_dir / p) for p in test_rows["path"]]
    out = tmp_path / "explain"
    run(["explain", *images, "--target", "covid", "--target", "lesions", "--out", str(out)], trained["home"])
    records = json.loads((out / "explanations.json").read_text())
    assert [r["target"] for r in records[:6]] == ["covid", "GGO", "Csld", "CrPa", "AirBr", "InSepThi"]
    assert len(records) == 12
    for r in records:
        heat = np.load(out / r["map"])
        assert heat.shape == (64, 64) and 0 <= heat.min() and heat.max() <= 1  # the model's input grid
        mask = cv2.imread(str(out / r["mask"]), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
        overlay = cv2.imread(str(out / r["overlay"]))
        assert overlay is not None and overlay.shape[0] > 200
        box = json.loads((out / r["overlay"].replace(".png", "_box.json")).read_text())["box"]
        ys, xs = np.nonzero(mask)
        if not len(ys):  # an all-zero map (no positive evidence for this target) has no box
            assert box is None and heat.max() == 0
            continue
        assert box == {"x": xs.min(), "y": ys.min(), "w": xs.max() - xs.min() + 1, "h": ys.max() - ys.min() + 1}
    gallery = (out / "gallery.html").read_text()
    assert gallery.count("<img ") == 12 and all(r["overlay"] in gallery for r in records)


def test_explain_bad_target_and_bad_file_are_one_line(trained, covid_ct_dir, tmp_path):
    image = str(sorted((covid_ct_dir / "images" / "covid").glob("*.png"))[0])
    proc = run(["explain", image, "--target", "Effusion", "--out", str(tmp_path / "a")], trained["home"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "unknown target 'Effusion'" in proc.stderr
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    proc = run(["explain", image, str(broken), "--out", str(tmp_path / "b")], trained["home"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(broken) in proc.stderr
    assert len(json.loads((tmp_path / "b" / "explanations.json").read_text())) == 1  # the good image still done


def test_evaluate_localization_scores_energy_in_ct_lungs(trained, covid_ct_dir, tmp_path):
    out = tmp_path / "loc"
    run(["evaluate-localization", str(covid_ct_dir / "manifest.csv"), "--lungs", "ct", "--limit", "6",
         "--out", str(out)], trained["home"])
    result = json.loads((out / "localization.json").read_text())
    assert result["n_images"] == 6 and result["split"] == "test"
    energy = result["by_class"]["all"]["energy_in_lungs"]
    assert 0 <= energy["mean"] <= 1 and energy["n"] >= 4
    per_image = pd.read_csv(out / "localization_per_image.csv")
    assert len(per_image) == 6 and per_image["energy_in_lungs"].dropna().between(0, 1).all()


def test_a_command_group_alone_prints_its_help_without_a_traceback(tmp_path):
    proc = run(["datasets"], tmp_path, check=False)
    assert proc.returncode == 0 and "describe" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
