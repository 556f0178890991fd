"""External evaluation, calibration and source-held-out splits (issue: does it hold outside its dataset?)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from chestdx.errors import ChestDxError
from chestdx.evaluate.calibration import (apply_temperature, brier_score, expected_calibration_error,
                                          fit_temperature)
from chestdx.evaluate.external import ExternalRow, aggregate, label_mapping, slice_table


def test_series_aggregation_on_a_toy_series():
    p = np.array([0.1, 0.9, 0.2, 0.8, 0.3])
    assert aggregate(p, "mean", 2) == pytest.approx(0.46)
    assert aggregate(p, "max", 2) == pytest.approx(0.9)
    assert aggregate(p, "topk", 2) == pytest.approx(0.85)
    assert aggregate(p, "topk", 50) == pytest.approx(0.46)  # k beyond the series: all slices
    multi = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    np.testing.assert_allclose(aggregate(multi, "topk", 1), [0.7, 0.8])
    with pytest.raises(ChestDxError, match="median"):
        aggregate(p, "median", 2)


def test_slice_labels_decide_which_slices_of_a_positive_series_count():
    rows = [ExternalRow(None, "covid", 1, "P1", "s", "covid/P1"), ExternalRow(None, "normal", 0, "N1", "s", "normal/N1"),
            ExternalRow(None, "covid", 1, "P2", "s", "covid/P2")]
    predictions = [{"probs": np.array([0.9, 0.2, 0.7]), "files": ["a", "b", "c"]},
                   {"probs": np.array([0.1, 0.4]), "files": ["a", "b"]},
                   {"probs": np.array([0.6]), "files": ["a"]}]
    marks = {("covid/P1", "a"): 1, ("covid/P1", "b"): 0, ("covid/P1", "c"): 1, ("normal/N1", "a"): 1}
    table = slice_table(rows, predictions, marks, positive=1)
    # P1's unmarked slice b is left out; every normal slice is negative (marks or not); P2 has no
    # slice labels, so its slice takes the series label.
    assert list(zip(table["series"], table["file"], table["target"])) == [
        ("covid/P1", "a", 1), ("covid/P1", "c", 1), ("normal/N1", "a", 0), ("normal/N1", "b", 0), ("covid/P2", "a", 1)]
    np.testing.assert_allclose(table["p"], [0.9, 0.7, 0.1, 0.4, 0.6])


def test_label_map_onto_the_models_classes():
    m = label_mapping(["cap=noncovid", "normal = noncovid"], ["noncovid", "covid"])
    assert m == {"noncovid": "noncovid", "covid": "covid", "cap": "noncovid", "normal": "noncovid"}
    with pytest.raises(ChestDxError, match="not one of the model's classes"):
        label_mapping(["cap=pneumonia"], ["noncovid", "covid"])
    with pytest.raises(ChestDxError, match="LABEL=CLASS"):
        label_mapping(["cap"], ["noncovid", "covid"])


def _overconfident(n=4000, scale=4.0, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)  # the true probability is sigmoid(z)
    return y, 1 / (1 + np.exp(-scale * z))  # the model claims sigmoid(4 z): far too sure


def test_temperature_scaling_lowers_ece_on_a_miscalibrated_toy_model():
    y, p = _overconfident()
    t = fit_temperature(y[:2000], p[:2000])  # fitted on "validation", judged on the other half
    assert t == pytest.approx(4.0, rel=0.15)
    before, after = expected_calibration_error(y[2000:], p[2000:]), expected_calibration_error(
        y[2000:], apply_temperature(p[2000:], t))
    assert before > 0.1 and after < 0.04
    assert brier_score(y[2000:], apply_temperature(p[2000:], t)) < brier_score(y[2000:], p[2000:])
    # AUC's ranking is untouched: temperature is monotone.
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, apply_temperature(p, t)) == pytest.approx(roc_auc_score(y, p), abs=1e-9)
    # Multi-class: softmax of log p / T.
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1, (3000, 3)) * 2
    true = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y3 = np.array([rng.choice(3, p=row) for row in true])
    sharp = np.exp(3 * logits) / np.exp(3 * logits).sum(1, keepdims=True)
    t3 = fit_temperature(y3, sharp)
    assert t3 == pytest.approx(3.0, rel=0.15)
    assert expected_calibration_error(y3, apply_temperature(sharp, t3)) < expected_calibration_error(y3, sharp) / 3


def test_the_bundle_temperature_reaches_every_prediction(tiny_models_dir, tmp_path):
    import torch

    from chestdx.inference import Predictor
    from chestdx.models.bundle import save_bundle

    bundle = torch.load(tiny_models_dir / "ladnn-tiny.pt", map_location="cpu", weights_only=False)
    plain = Predictor(tiny_models_dir / "ladnn-tiny.pt")
    bundle["calibration"] = {"head": "diagnosis", "temperature": 2.5}
    save_bundle(bundle, tmp_path / "calibrated.pt")
    calibrated = Predictor(tmp_path / "calibrated.pt")
    x = torch.rand(3, 1, 64, 64)
    raw = plain.predict_tensor(x)
    cal = calibrated.predict_tensor(x)
    np.testing.assert_allclose(cal["diagnosis"], apply_temperature(raw["diagnosis"], 2.5), atol=1e-6)
    np.testing.assert_allclose(cal["lesions"], raw["lesions"], atol=1e-7)  # only the calibrated head moves


def test_leave_one_source_out_never_tests_on_a_training_source(cxr_covid_dir):
    from chestdx.data.manifest import Manifest
    from chestdx.train.cv import source_out_manifests

    manifest = Manifest.from_csv(cxr_covid_dir / "manifest.csv")
    folds = source_out_manifests(manifest)
    assert set(folds) == set(manifest.frame["source"]) and len(folds) >= 3
    for source, fold in folds.items():
        f = fold.frame
        assert set(f.loc[f["split"] == "test", "source"]) == {source}
        assert (f.loc[f["source"] == source, "split"] == "test").all()
        assert source not in set(f.loc[f["split"] != "test", "source"])
        assert 0.1 < (f["split"] == "val").sum() / (f["split"] != "test").sum() < 0.3
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            assert not set(f.loc[f["split"] == a, "patient_id"]) & set(f.loc[f["split"] == b, "patient_id"])


def test_a_patient_in_two_sources_is_refused():
    from chestdx.data.splits import leave_source_out_tags

    with pytest.raises(ChestDxError, match="more than one source"):
        leave_source_out_tags(["a", "b", "a", "b"], ["p1", "p1", "p2", "p3"], ["x", "y", "x", "y"])


def test_external_evaluation_of_covid_ct_md_series_slice_by_slice(covid_ct_md_dir, covid_ct_dir, tiny_models_dir,
                                                                   tmp_path):
    import shutil

    from chestdx.data.input_check import add_input_reference, manifest_images
    from chestdx.data.manifest import Manifest
    from chestdx.evaluate.external import evaluate_external

    model = tmp_path / "model.pt"  # the tiny model with an input reference of 12 covid-ct training images
    shutil.copy(tiny_models_dir / "ladnn-tiny.pt", model)
    images, patients = manifest_images(Manifest.from_csv(covid_ct_dir / "manifest.csv"), "train", max_images=12)
    add_input_reference(model, images, groups=patients)

    manifest = pd.read_csv(covid_ct_md_dir / "manifest.csv")
    subset = manifest[manifest["patient_id"].isin(["P002", "normal001", "cap002"])].copy()
    subset["path"] = [str(covid_ct_md_dir / p) for p in subset["path"]]
    subset.to_csv(tmp_path / "external.csv", index=False)
    slices = pd.read_csv(covid_ct_md_dir / "slices.csv")
    slices["series"] = [str(covid_ct_md_dir / s) for s in slices["series"]]
    slices.to_csv(tmp_path / "slices.csv", index=False)
    m = evaluate_external(model, tmp_path / "external.csv", tmp_path / "out",
                          ["cap=noncovid", "normal=noncovid"], tmp_path / "slices.csv", n_boot=50, workers=0,
                          progress=False)
    assert m["external"] and "external set" in m["statement"] and m["errors"] == []
    assert m["n_images"] == 133 + 154 + 131
    s = m["slices"]
    # P002's 68 marked slices against every slice of the normal and the CAP series.
    assert s["all_negatives"]["n_positive"] == 68 and s["all_negatives"]["n"] == 68 + 154 + 131
    assert s["vs_normal"]["n"] == 68 + 154 and s["vs_cap"]["n"] == 68 + 131
    assert 0 <= s["all_negatives"]["auc_ci"][0] <= s["all_negatives"]["auc"] <= s["all_negatives"]["auc_ci"][1] <= 1
    rows = {r["series"].split("/")[-1]: r for r in m["series_rows"]}
    assert set(rows) == {"P002", "normal001", "cap002"} and rows["P002"]["n_slices"] == 133
    table = pd.read_csv(tmp_path / "out" / "predictions_slices.csv")
    marked = table.loc[table["series"].str.endswith("P002"), "p"]  # the table holds P002's marked slices only
    assert len(marked) == 68 and rows["P002"]["max"] >= marked.max() - 1e-5
    normal = table.loc[table["series"].str.endswith("normal001"), "p"].to_numpy()
    assert rows["normal001"]["mean"] == pytest.approx(normal.mean(), abs=1e-5)
    assert rows["normal001"]["topk"] == pytest.approx(np.sort(normal)[-5:].mean(), abs=1e-5)
    assert m["aggregation"]["used"] == "topk" and m["aggregation"]["top_k"] == 5
    for name in ("report.html", "report.md", "roc.png", "reliability.png", "predictions_series.csv"):
        assert (tmp_path / "out" / name).is_file()
    assert "This is an external set" in (tmp_path / "out" / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["slices"]["vs_cap"]["n"] == 68 + 131
    # The input check's distance, per slice, as `chestdx predict` measures that slice file on its own.
    from chestdx.data.input_check import reference_distance
    from chestdx.data.io import read_image
    from chestdx.inference import Predictor

    predictor = Predictor(model)
    first = table[table["series"].str.endswith("normal001")].iloc[0]
    alone = read_image(covid_ct_md_dir / "images" / "normal" / "normal001" / first["file"],
                       hu_window=predictor.hu_window)
    assert first["input_distance"] == pytest.approx(
        reference_distance(alone, predictor.input_reference)["distance"], rel=1e-3)
    limit = predictor.input_reference["limit"]
    assert m["input_distance"]["share_beyond_limit"] == pytest.approx((table["input_distance"] > limit).mean())
    # Heat maps on 24 positive and 24 negative slices, each scored by its share inside the lungs.
    att = m["attention"]
    assert att["n"] + att["no_lungs_found"] + att["empty_maps"] == 48
    # The untrained model's maps for covid are all zero (counted, left out); its noncovid maps are not.
    from chestdx.evaluate.external import attention_in_lungs, label_mapping, read_external_manifest

    classes = ["noncovid", "covid"]
    rows = read_external_manifest(tmp_path / "external.csv", classes,
                                  label_mapping(["cap=noncovid", "normal=noncovid"], classes))
    att = attention_in_lungs(predictor, rows, table, "noncovid", 4)
    assert att["n"] + att["no_lungs_found"] + att["empty_maps"] == 8 and att["n"] > 0
    assert 0 < att["share_in_lungs"] < 1 and 0 < att["lung_area_share"] < 1


def test_external_manifest_errors_name_the_file_and_the_fix(covid_ct_md_dir, tiny_models_dir, tmp_path):
    from tests.test_cli import run

    pd.DataFrame({"path": [str(covid_ct_md_dir / "images/cap/cap001")], "label": ["cap"],
                  "patient_id": ["cap001"]}).to_csv(tmp_path / "m.csv", index=False)
    res = run(["evaluate", "--checkpoint", str(tiny_models_dir / "ladnn-tiny.pt"), "--manifest",
               str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")], tmp_path, check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "m.csv" in res.stderr and "--map cap=" in res.stderr
    pd.DataFrame({"path": ["nowhere/x"], "label": ["covid"], "patient_id": ["x"]}).to_csv(tmp_path / "g.csv",
                                                                                       index=False)
    res = run(["evaluate", "--checkpoint", str(tiny_models_dir / "ladnn-tiny.pt"), "--manifest",
               str(tmp_path / "g.csv"), "--out", str(tmp_path / "o")], tmp_path, check=False)
    assert res.returncode != 0 and "row 2" in res.stderr and "does not exist" in res.stderr
    res = run(["evaluate", "--checkpoint", str(tiny_models_dir / "ladnn-tiny.pt"), "--map", "cap=noncovid"],
              tmp_path, check=False)
    assert res.returncode != 0 and "only with --manifest" in res.stderr


def test_batched_prediction_equals_one_at_a_time_and_keeps_bad_files_in_place(tiny_models_dir, covid_ct_dir,
                                                                             tmp_path):
    from chestdx.inference import Predictor

    predictor = Predictor(tiny_models_dir / "ladnn-tiny.pt")
    files = sorted((covid_ct_dir / "images" / "covid").glob("*.png"))[:5]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    paths = files[:2] + [bad] + files[2:]
    out = list(predictor.predict_files(paths, batch_size=2, workers=0))
    assert [p for p, _, _ in out] == paths
    assert out[2][1] is None and "bad.png" in out[2][2]
    for path, result, error in out[:2] + out[3:]:
        assert error is None
        one = predictor.predict_source(path)
        assert result["prediction"] == one["prediction"]
        assert result["probabilities"]["covid"] == pytest.approx(one["probabilities"]["covid"], abs=1e-5)
    # Decoding in worker processes after this process has run forward passes (a forked worker could hang
    # here): the same answers, in the same order.
    parallel = list(predictor.predict_files(paths, batch_size=2, workers=2))
    assert [(p, e is None) for p, _, e in parallel] == [(p, e is None) for p, _, e in out]
    for (_, a, _), (_, b, _) in zip(parallel, out):
        assert a is None or a["probabilities"]["covid"] == pytest.approx(b["probabilities"]["covid"], abs=1e-6)


def test_onnx_is_used_only_when_the_export_is_of_this_bundle(tiny_models_dir, tmp_path):
    import shutil

    import torch

    from chestdx.export import export_onnx
    from chestdx.inference import predictor_for
    from chestdx.models.bundle import save_bundle

    bundle_path = tmp_path / "model.pt"
    shutil.copy(tiny_models_dir / "ladnn-tiny.pt", bundle_path)
    assert predictor_for(bundle_path).backend == "pytorch"  # no export yet
    with pytest.raises(ChestDxError, match="no current ONNX export"):
        predictor_for(bundle_path, "onnx")
    export_onnx(bundle_path)
    onnx, torch_p = predictor_for(bundle_path), predictor_for(bundle_path, "pytorch")
    assert onnx.backend == "onnxruntime" and torch_p.backend == "pytorch"
    x = torch.rand(2, 1, 64, 64)
    np.testing.assert_allclose(onnx.predict_tensor(x)["diagnosis"], torch_p.predict_tensor(x)["diagnosis"], atol=1e-4)
    bundle = torch.load(bundle_path, map_location="cpu", weights_only=False)
    bundle["thresholds"] = {"diagnosis": [0.7]}  # retrained or edited: the export is stale now
    save_bundle(bundle, bundle_path)
    assert predictor_for(bundle_path).backend == "pytorch"
