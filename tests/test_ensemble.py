"""Seed ensembles: averaged probabilities, bundles, CAMs, and training K members on real data."""

import copy
import json

import numpy as np
import pytest
import torch

from chestdx.explain import explain
from chestdx.export import export_onnx, load_onnx
from chestdx.models import create_model, get_entry
from chestdx.models.bundle import load_bundle, make_bundle, save_bundle
from chestdx.models.ensemble import Ensemble
from chestdx.train.config import load_config


def _members(name, n=3, **kw):
    torch.manual_seed(0)
    return [create_model(name, backbone="resnet18", **kw).eval() for _ in range(n)]


def _ensemble(name, members):
    return Ensemble(members, get_entry(name).heads)


def test_binary_ensemble_averages_member_probabilities():
    members = _members("ladnn")
    with torch.no_grad():  # confident members, so averaging probabilities and logits differ visibly
        for m in members:
            m.covid_head.weight.mul_(200)
    x = torch.randn(4, 1, 64, 64)
    with torch.no_grad():
        outs = [m(x) for m in members]
        got = _ensemble("ladnn", members)(x)
    want = torch.stack([torch.sigmoid(o["logits"]) for o in outs]).mean(0)
    torch.testing.assert_close(torch.sigmoid(got["logits"]), want, atol=1e-5, rtol=1e-5)
    want_lesions = torch.stack([torch.sigmoid(o["lesion_logits"]) for o in outs]).mean(0)
    torch.testing.assert_close(torch.sigmoid(got["lesion_logits"]), want_lesions, atol=1e-5, rtol=1e-5)
    # Not the sigmoid of the mean logit: the two differ for members that disagree.
    assert not torch.allclose(torch.sigmoid(torch.stack([o["logits"] for o in outs]).mean(0)), want, atol=1e-4)


def test_multiclass_ensemble_averages_softmax():
    members = _members("cxr_plain")
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        want = torch.stack([torch.softmax(m(x)["logits"], 1) for m in members]).mean(0)
        got = torch.softmax(_ensemble("cxr_plain", members)(x)["logits"], 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_ensemble_bundle_round_trip_and_cam(tmp_path):
    cfg = load_config(None, ["model.backbone=resnet18", "model.pretrained=none", "train.ensemble=2", "preprocess.size=64"])
    ensemble = _ensemble("ladnn", _members("ladnn", n=2)).eval()
    path = save_bundle(make_bundle(ensemble, cfg), tmp_path / "m.pt")
    loaded, meta = load_bundle(path)
    assert meta["ensemble"] == 2 and isinstance(loaded, Ensemble)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["logits"], ensemble(x)["logits"])
    assert len(loaded.target_layers()) == 2
    maps = explain(loaded, x, method="gradcam", target="covid", heads=get_entry("ladnn").heads).maps
    assert maps.shape == (2, 1, 64, 64) and np.isfinite(maps).all()
    onnx_model, _ = load_onnx(export_onnx(path, tmp_path / "m.onnx"))
    torch.testing.assert_close(onnx_model(x)["logits"], ensemble(x)["logits"].detach(), atol=1e-4, rtol=1e-4)


def test_fit_trains_each_member_and_bundles_the_ensemble(tmp_path, covid_ct_dir):
    from chestdx.train.run import fit

    cfg = load_config("configs/ladnn_covidct.yaml", [
        "train.limit_per_split=16", "train.batch_size=8", "preprocess.size=64", "train.epochs=1",
        "train.ensemble=2", "train.seed=5"])
    path = fit(copy.deepcopy(cfg), tmp_path / "run", progress=False)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert [m["seed"] for m in summary["members"]] == [5, 6]
    model, bundle = load_bundle(path)
    m0, _ = load_bundle(tmp_path / "run" / "member_0" / "model.pt")
    m1, _ = load_bundle(tmp_path / "run" / "member_1" / "model.pt")
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        want = (torch.sigmoid(m0(x)["logits"]) + torch.sigmoid(m1(x)["logits"])) / 2
        torch.testing.assert_close(torch.sigmoid(model(x)["logits"]), want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(m0(x)["logits"], m1(x)["logits"])  # different seeds, different members
    assert 0.0 <= bundle["validation"]["auc"] <= 1.0 and len(bundle["thresholds"]["diagnosis"]) == 1
    # A second call reuses the finished members instead of training them again.
    before = (tmp_path / "run" / "member_0" / "model.pt").stat().st_mtime
    fit(copy.deepcopy(cfg), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "member_0" / "model.pt").stat().st_mtime == before


def test_a_finished_member_is_kept_only_for_the_same_settings(tmp_path, covid_ct_dir):
    from chestdx.errors import ChestDxError
    from chestdx.train.run import fit

    overrides = ["train.limit_per_split=16", "train.batch_size=8", "preprocess.size=64", "train.epochs=1",
                 "train.ensemble=2"]
    run_dir = tmp_path / "run"
    fit(load_config("configs/ladnn_covidct.yaml", overrides), run_dir, progress=False)
    for name in ("run_spec.json", "train_summary.json"):  # the ensemble folder forgets; its members must not
        (run_dir / name).unlink()
    with pytest.raises(ChestDxError, match=r"member_0 holds a run with other settings \(train\.lr"):
        fit(load_config("configs/ladnn_covidct.yaml", [*overrides, "train.lr=1e-3"]), run_dir, progress=False)
    # More epochs: the finished members are not kept as they are but resumed for the extra epoch.
    fit(load_config("configs/ladnn_covidct.yaml", [*overrides, "train.epochs=2"]), run_dir, progress=False)
    for k in (0, 1):
        member = json.loads((run_dir / f"member_{k}" / "train_summary.json").read_text())
        assert member["config"]["train"]["epochs"] == 2
        logs = sorted((run_dir / f"member_{k}" / "logs").glob("version_*/metrics.csv"))
        assert len(logs) == 2  # a first run, then a resumed one
