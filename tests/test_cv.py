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


def test_publication_groups_keep_a_paper_and_a_patient_together():
    from chestdx.data.splits import publication_groups

    paths = ["covid/2020.01.24.919183-p27-132.png", "covid/2020.01.24.919183-p28-140%1.png",  # one preprint
             "covid/bmj.m606.full-p4-22%0.png",                                              # another paper
             "covid/2020.02.10.20021584-p6-52.png",  # its patient also appears in bmj.m606: the two join
             "covid/PIIS0140673620301549_0%1.png", "covid/PIIS0140673620301549_2.png",  # an article id
             "noncovid/39%3.jpg", "noncovid/40%0.jpg"]  # no paper in the name: the patient's group
    patients = ["c1", "c2", "c3", "c3", "c4", "c5", "n39", "n40"]
    groups = publication_groups(paths, patients)
    assert groups[0] == groups[1] == "2020.01.24.919183"
    assert groups[2] == groups[3] and groups[2] != groups[0]
    assert groups[4] == groups[5] == "PIIS0140673620301549"
    assert groups[6] == "patient:n39" and groups[7] == "patient:n40"


def test_publication_folds_never_split_a_preprint_of_covid_ct(covid_ct_dir):
    from chestdx.data.splits import publication_groups

    manifest = Manifest.from_csv(covid_ct_dir / "manifest.csv")
    groups = pd.Series(publication_groups(manifest.frame["path"], manifest.frame["patient_id"]))
    assert 30 < groups[manifest.frame["label"].to_numpy() == "covid"].nunique() < 80  # preprints, not patients
    for fold in fold_manifests(manifest, 5, group_by="publication"):
        split = fold.frame["split"].reset_index(drop=True)
        assert split.groupby(groups).nunique().max() == 1  # a preprint sits in one split only
        assert fold.frame.groupby("patient_id")["split"].nunique().max() == 1
    with pytest.raises(ChestDxError, match="--group-by"):
        fold_manifests(manifest, 5, group_by="hospital")
