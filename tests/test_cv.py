"""Patient-level cross-validation: fold manifests, and `chestdx train --folds` on a small real subset."""

import json

import numpy as np
import pandas as pd
import pytest

from chestdx.data.manifest import Manifest
from chestdx.errors import ChestDxError
from chestdx.train.cv import fold_manifests
from tests.test_cli import run


def _synthetic_manifest(n_patients=30, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label, source = ("covid", "noncovid")[p % 2], ("a", "b")[(p // 2) % 2]
        rows += [{"path": f"p{p}_{i}.png", "label": label, "patient_id": f"p{p}", "source": source}
                 for i in range(int(rng.integers(1, 4)))]
    return Manifest.from_frame(pd.DataFrame(rows), ".", classes=("noncovid", "covid"))


def test_every_image_is_tested_once_and_patients_never_cross_splits():
    manifest = _synthetic_manifest()
    folds = fold_manifests(manifest, 5)
    tested = pd.concat([f.frame[f.frame["split"] == "test"] for f in folds])
    assert sorted(tested["path"]) == sorted(manifest.frame["path"])
    for k, fold in enumerate(folds):
        assert fold.frame.groupby("patient_id")["split"].nunique().max() == 1
        # fold k+1's test images select fold k's model
        val = set(fold.frame.loc[fold.frame["split"] == "val", "path"])
        assert val == set(folds[(k + 1) % 5].frame.loc[folds[(k + 1) % 5].frame["split"] == "test", "path"])
        test = fold.frame[fold.frame["split"] == "test"]
        assert set(test["label"]) == {"covid", "noncovid"} and set(test["source"]) == {"a", "b"}  # stratified


def test_fewer_than_three_folds_is_a_clear_error():
    with pytest.raises(ChestDxError, match="at least 3"):
        fold_manifests(_synthetic_manifest(), 2)


@pytest.fixture()
def small_covid_ct(covid_ct_dir, tmp_path):
    """A data root whose covid-ct holds 14 single-image patients per class (images linked, not copied)."""
    frame = pd.read_csv(covid_ct_dir / "manifest.csv", dtype={"patient_id": str})
    single = frame.groupby("patient_id").filter(lambda g: len(g) == 1)
    subset = pd.concat([g.head(14) for _, g in single.groupby("label")]).drop(columns="split")
    root = tmp_path / "data" / "covid-ct"
    root.mkdir(parents=True)
    (root / "images").symlink_to(covid_ct_dir / "images")
    subset.to_csv(root / "manifest.csv", index=False)
    return root


def test_cli_cross_validation_tests_each_image_once(small_covid_ct, tmp_path, monkeypatch):
    monkeypatch.setenv("CHESTDX_DATA", str(small_covid_ct.parent))
    out = tmp_path / "cv"
    proc = run(["train", "--config", "configs/ladnn_covidct.yaml", "--run-dir", str(out), "--folds", "3",
                "--set", "train.epochs=1", "--set", "train.batch_size=8", "--set", "preprocess.size=64",
                "--set", "evaluate.bootstrap=20"], tmp_path / "home")
    assert "mean ± sd" in proc.stdout
    assert "sensitivity" in proc.stdout and "specificity" in proc.stdout  # piped, yet not squeezed
    summary = json.loads((out / "cv_summary.json").read_text())
    assert len(summary["folds"]) == 3 and sum(f["n_test"] for f in summary["folds"]) == 28
    assert summary["mean"]["auc"] == pytest.approx(np.mean([f["auc"] for f in summary["folds"]]))
    tested = pd.concat([pd.read_csv(out / f"fold{k}" / "eval" / "predictions_test.csv") for k in range(3)])
    assert tested["path"].is_unique and len(tested) == 28
    # The config's 2-member ensemble: both members trained on the fold's own split, not the dataset's.
    for k in range(3):
        fold = json.loads((out / f"fold{k}" / "train_summary.json").read_text())
        members = [json.loads((out / f"fold{k}" / f"member_{m}" / "train_summary.json").read_text()) for m in (0, 1)]
        assert {m["data_fingerprint"] for m in members} == {fold["data_fingerprint"]}
    # Re-run with another learning rate into the same folder: refused in one line, nothing retrained.
    before = (out / "fold0" / "model.pt").stat().st_mtime
    again = run(["train", "--config", "configs/ladnn_covidct.yaml", "--run-dir", str(out), "--folds", "3",
                 "--set", "train.epochs=1", "--set", "train.batch_size=8", "--set", "preprocess.size=64",
                 "--set", "train.lr=1e-3"], tmp_path / "home", check=False)
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert "fold0 holds a run with other settings" in again.stdout + again.stderr and "train.lr" in again.stdout + again.stderr
    assert (out / "fold0" / "model.pt").stat().st_mtime == before


def test_cli_rejects_two_folds(tmp_path):
    proc = run(["train", "--config", "configs/ladnn_covidct.yaml", "--folds", "2"], tmp_path, check=False)
    assert proc.returncode != 0 and "at least 3" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
