import numpy as np
import pandas as pd
import pytest

from chestdx.data import Manifest, check_no_leakage, get_dataset, stratified_group_kfold, train_val_test_split
from chestdx.errors import ChestDxError, DataLeakageError


def test_leakage_is_an_error_naming_the_patient():
    with pytest.raises(DataLeakageError, match="p2"):
        check_no_leakage(["p1", "p2", "p2", "p3"], ["train", "train", "test", "val"])
    check_no_leakage(["p1", "p1", "p2"], ["train", "train", "test"])  # no error


def test_manifest_with_a_leaking_patient_is_refused(tmp_path):
    frame = pd.DataFrame({"path": ["a.png", "b.png"], "label": ["covid", "covid"], "patient_id": ["x", "x"],
                          "split": ["train", "test"]})
    with pytest.raises(DataLeakageError):
        Manifest.from_frame(frame, tmp_path)


def test_manifest_errors_name_the_problem(tmp_path):
    with pytest.raises(ChestDxError, match="missing column"):
        Manifest.from_frame(pd.DataFrame({"path": ["a"], "label": ["x"]}), tmp_path)
    frame = pd.DataFrame({"path": ["a"], "label": ["flu"], "patient_id": ["1"]})
    with pytest.raises(ChestDxError, match="not among the classes"):
        Manifest.from_frame(frame, tmp_path, classes=("covid", "noncovid"))


def test_stratified_group_kfold_keeps_patients_together_and_balances_classes():
    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i}" for i in range(100)], rng.integers(1, 5, 100))
    labels = np.array([int(p[1:]) % 2 for p in patients])
    folds = stratified_group_kfold(labels, patients, n_splits=5, seed=1)
    seen = np.zeros(len(labels), int)
    for train_idx, test_idx in folds:
        assert not set(patients[train_idx]) & set(patients[test_idx])
        assert abs(labels[test_idx].mean() - labels.mean()) < 0.15
        seen[test_idx] += 1
    assert np.all(seen == 1)  # every image tested exactly once


def test_train_val_test_split_by_patient():
    patients = np.repeat([f"p{i}" for i in range(80)], 3)
    labels = np.array([int(p[1:]) % 2 for p in patients])
    tags = train_val_test_split(labels, patients, val=0.15, test=0.25, seed=0)
    for split in ("train", "val", "test"):
        assert (tags == split).any()
    check_no_leakage(patients, tags)
    assert 0.15 < (tags == "test").mean() < 0.35


def test_covid_ct_manifest_matches_its_readme(covid_ct_dir):
    m = get_dataset("covid-ct").manifest()
    assert len(m) == 746
    assert m.classes == ("noncovid", "covid")
    counts = {s: len(m.subset(s)) for s in ("train", "val", "test")}
    assert counts == {"train": 425, "val": 118, "test": 203}
    from chestdx.models.ladnn import DIAGNOSIS, LESION_HEAD

    values, known = m.head_targets(LESION_HEAD)
    targets, known_diagnosis = m.head_targets(DIAGNOSIS)
    assert known_diagnosis.all() and values.shape == (746, 5)
    assert known[targets == 0].sum() == 0  # negatives: lesions unknown, never "absent"
    assert known[targets == 1].mean() > 0.9
    assert m.fingerprint() == m.fingerprint() and len(m.fingerprint()) == 16


def test_missing_dataset_says_where_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("CHESTDX_DATA", str(tmp_path))
    with pytest.raises(ChestDxError, match="UCSD-AI4H/COVID-CT"):
        get_dataset("covid-ct").manifest()
