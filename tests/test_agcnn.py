"""AG-CNN (models/agcnn.py): heat map -> mask -> largest region -> crop, the three training stages,
the fusion width, and the multi-label loss and metrics against hand values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chestdx.data.cxr14_labels import CXR14_LABELS, NIH_LABELS
from chestdx.evaluate.metrics import multilabel_metrics
from chestdx.models import get_entry
from chestdx.models.agcnn import (FUSION, attention_box, attention_boxes, crop_and_resize, heat_map,
                                  normalised_heat_map)
from chestdx.models.bundle import load_bundle
from chestdx.tasks import Head, get_task

from tests.toy import weights


def small_agcnn(**kw):
    return get_entry("agcnn").build(pretrained=None, backbone="resnet18", **kw).eval()


def test_heat_map_statistics_by_hand():
    f = torch.tensor([[1.0, -4.0], [2.0, 2.0], [-3.0, 0.0]]).reshape(1, 3, 1, 2)
    assert heat_map(f, "max").flatten().tolist() == [3.0, 4.0]  # Eq. 3: max_k |f_k|
    assert heat_map(f, "l1").flatten().tolist() == pytest.approx([2.0, 2.0])  # (1/K) sum_k |f_k|
    assert heat_map(f, "l2").flatten().tolist() == pytest.approx([math.sqrt(14) / 3, math.sqrt(20) / 3])
    h = normalised_heat_map(f, (1, 2))
    assert h.flatten().tolist() == pytest.approx([0.0, 1.0])


def test_largest_region_box_and_flat_map():
    heat = np.zeros((20, 30), np.float32)
    heat[2:6, 3:8] = 0.9      # 20 pixels above tau
    heat[10:18, 12:27] = 0.8  # 120 pixels: the largest region
    heat[0, 29] = 1.0         # one bright pixel alone
    assert attention_box(heat, 0.7) == (12, 10, 27, 18)
    assert attention_box(heat, 0.85) == (3, 2, 8, 6)  # the 0.8 region drops out above its value
    assert attention_box(np.zeros((20, 30)), 0.7) == (0, 0, 30, 20)  # nothing passes: the whole image


def test_crop_and_resize_samples_the_box():
    ramp = torch.arange(32, dtype=torch.float32).repeat(32, 1)[None, None]  # value = column index
    box = torch.tensor([[8.0, 4.0, 24.0, 20.0]])
    crop = crop_and_resize(ramp, box, (32, 32))
    cols = torch.arange(32, dtype=torch.float32)
    expected = 8 + (cols + 0.5) * 16 / 32 - 0.5  # bilinear interpolation of a ramp is exact
    assert torch.allclose(crop[0, 0, 5], expected, atol=1e-4)
    whole = crop_and_resize(ramp, torch.tensor([[0.0, 0.0, 32.0, 32.0]]))
    assert torch.allclose(whole, ramp, atol=1e-4)


def test_the_crop_lands_on_the_bright_blob(monkeypatch):
    """A synthetic image with one large bright blob and a smaller, equally bright one; the global
    branch's features stand in for the image itself (8 x 8 average), so the heat map is the blob."""
    model = small_agcnn(tau=0.7)
    x = torch.zeros(1, 1, 64, 64)
    x[0, 0, 8:28, 32:56] = 1.0   # the blob: rows 8-27, columns 32-55
    x[0, 0, 44:52, 4:12] = 1.0   # a smaller one
    monkeypatch.setattr(model.global_branch.backbone, "forward_features", lambda t: F.avg_pool2d(t, 8).expand(-1, 512, -1, -1))
    with torch.no_grad():
        out = model(x)
    x0, y0, x1, y1 = out["boxes"][0].tolist()
    truth = (32, 8, 56, 28)
    inter = max(0, min(x1, truth[2]) - max(x0, truth[0])) * max(0, min(y1, truth[3]) - max(y0, truth[1]))
    union = (x1 - x0) * (y1 - y0) + 24 * 20 - inter
    assert inter / union > 0.6, out["boxes"]
    crop = crop_and_resize(x, out["boxes"])
    assert crop.mean() > 0.8 > x.mean()  # the local branch sees the blob, not the background
    assert out["heatmap"].shape == (1, 64, 64) and float(out["heatmap"].max()) == pytest.approx(1.0)


def test_fusion_takes_both_pooled_features():
    model = small_agcnn()
    width = model.global_branch.width + model.local_branch.width
    assert model.fusion.in_features == width == 2 * 512  # resnet18's last block
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 64))
    for branch in ("global", "local", "fusion"):
        assert out[branch].shape == (2, len(CXR14_LABELS))
    assert out["boxes"].shape == (2, 4)
    with torch.no_grad():
        only_global = model(torch.rand(2, 1, 64, 64), branches=("global",))
    assert "local" not in only_global and "fusion" not in only_global  # stage I computes its branch only


def test_uncapped_efficientnet_lite_gives_a_peaked_heat_map():
    model = get_entry("agcnn").build(pretrained=None, backbone="efficientnet_lite0")
    assert isinstance(model.global_branch.backbone.bn2.act, torch.nn.ReLU)
    assert not isinstance(model.global_branch.backbone.bn2.act, torch.nn.ReLU6)


def test_multilabel_loss_by_hand():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 1.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    known = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # the last entry unknown
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    by_hand = -(math.log(s(0.0)) + math.log(1 - s(2.0)) + math.log(1 - s(-1.0))) / 3  # Eq. 2 over known entries
    assert float(get_task("multilabel").loss(logits, target, known)) == pytest.approx(by_hand, rel=1e-6)


def test_multilabel_metrics_by_hand_and_the_disease_mean():
    labels = ("A", "B", "No Finding")
    y = np.array([[0, 1, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1]] * 5, dtype=float)
    p = np.array([[0.1, 0.9, 0.2], [0.4, 0.2, 0.1], [0.35, 0.6, 0.3], [0.8, 0.1, 0.9]] * 5)
    # A: positives 0.4, 0.35; negatives 0.1, 0.8: 2 of 4 pairs ordered -> AUC 0.5 (ties between copies count half)
    m = multilabel_metrics(y, p, None, labels, [0.5, 0.5, 0.5], mean_over=("A", "B"))
    assert m["per_label"]["A"]["auc"] == pytest.approx(0.5)
    assert m["per_label"]["B"]["auc"] == pytest.approx(1.0)
    assert m["per_label"]["A"]["positives"] == 10
    assert m["estimable_labels"] == ["A", "B"]  # No Finding is reported, not averaged
    assert m["macro_auc"] == pytest.approx(0.75)
    head = Head("x", "multilabel", labels, output="x", mean_over=("A", "B"))
    assert head.score(y, p) == pytest.approx(0.75)
    assert FUSION.averaged == NIH_LABELS


def _stage_config(tmp_path):
    from chestdx.train.config import apply_override, read_config_file, validate

    raw = read_config_file(Path("configs/agcnn_cxr14.yaml"))
    raw["stages"][0]["train"]["batch_size"] = 8  # the config's stage I batch is the paper's 128
    for item in ("model.backbone=resnet18", "model.pretrained=null", "preprocess.size=64", "train.limit_per_split=16",
                 "train.epochs=1", "train.batch_size=8", "evaluate.tta=false", "data.cache=none"):
        apply_override(raw, item)
    return validate(raw)


def test_three_stages_keep_frozen_branches_bit_identical(tmp_path):
    from chestdx.train.run import fit

    cfg = _stage_config(tmp_path)
    final = fit(cfg, tmp_path / "run", progress=False)
    stages = [load_bundle(tmp_path / "run" / f"stage{k}_{name}" / "model.pt")[0]
              for k, name in enumerate(("global", "local", "fusion"))]
    g1, g2, g3 = (weights(m, "global_branch.") for m in stages)
    l2, l3 = (weights(m, "local_branch.") for m in stages[1:])
    f2, f3 = (weights(m, "fusion.") for m in stages[1:])
    assert all(torch.equal(g1[k], g2[k]) for k in g1)  # stage II: global fixed, BN statistics included
    assert all(torch.equal(g2[k], g3[k]) for k in g2) and all(torch.equal(l2[k], l3[k]) for k in l2)  # stage III
    assert not all(torch.equal(f2[k], f3[k]) for k in f2)  # the fusion layer trained in stage III
    l1 = weights(stages[0], "local_branch.")
    assert not all(torch.equal(l1[k], l2[k]) for k in l1)  # the local branch trained in stage II
    final_model, bundle = load_bundle(final)
    assert bundle["primary"] == "fusion" and bundle["validation"]["head"] == "fusion"
    assert set(bundle["thresholds"]) == {"fusion", "global", "local"}


@pytest.fixture(scope="module")
def agcnn_bundle(tmp_path_factory):
    """An untrained AG-CNN (resnet18, 64 px) bundle with per-label thresholds, in its own models folder."""
    from chestdx.models.bundle import make_bundle, save_bundle
    from chestdx.train.config import load_config

    cfg = load_config("configs/agcnn_cxr14.yaml", ["model.backbone=resnet18", "model.pretrained=null",
                                                   "preprocess.size=64"])
    torch.manual_seed(0)
    model = get_entry("agcnn").build(pretrained=None, **{k: v for k, v in cfg["model"].items()
                                                        if k not in ("name", "pretrained")}).eval()
    bundle = make_bundle(model, cfg, validation={"auc": 0.5, "head": "fusion"})
    bundle["thresholds"] = {h: [0.5] * len(CXR14_LABELS) for h in ("fusion", "global", "local")}
    folder = tmp_path_factory.mktemp("agcnn_models")
    return save_bundle(bundle, folder / "agcnn-tiny.pt")


@pytest.fixture(scope="module")
def nih_images():
    from chestdx.data.datasets import get_dataset

    info = get_dataset("cxr14-sample")
    if not info.present():
        pytest.skip("cxr-covid not found")
    return info.manifest().subset("test").paths()[:6]


def _batch(predictor, files):
    from chestdx.data.io import read_image

    return torch.cat([predictor.preprocess(read_image(f).to_gray()) for f in files])


def test_onnx_two_graphs_match_pytorch_on_real_images(agcnn_bundle, nih_images, tmp_path):
    import json

    from chestdx.export import export_onnx
    from chestdx.inference import Predictor

    onnx_path = export_onnx(agcnn_bundle, tmp_path / "agcnn.onnx")
    meta = json.loads(onnx_path.with_suffix(".json").read_text())
    assert [g["file"] for g in meta["graphs"]] == ["agcnn.onnx", "agcnn.crop.onnx"]
    assert meta["between"] == "chestdx.models.agcnn:boxes_between"
    torch_p, onnx_p = Predictor(agcnn_bundle), Predictor(onnx_path)
    x = _batch(torch_p, nih_images)
    with torch.no_grad():
        a, b = torch_p.model(x), onnx_p.model(x)
    assert torch.equal(a["boxes"], b["boxes"])  # the same crop from both heat maps
    for key in ("global", "local", "fusion", "heatmap"):
        assert torch.allclose(a[key], b[key], atol=1e-3), key
    # the crop really is in the graph: other boxes give other local outputs
    moved = onnx_p.model.sessions[1][0].run(None, {"image": x.numpy(), "boxes": np.tile([[0, 0, 16, 16]], (len(x), 1))
                                                   .astype(np.float32), "global_pooled": b["global_pooled"].numpy()})
    assert not np.allclose(moved[0], b["local"].numpy(), atol=1e-3)
    # both graphs with the batch fixed (one more than given: zero rows padded through the crop step)
    from chestdx.export import load_onnx

    fixed = load_onnx(onnx_path, batch=len(x) + 1)[0]
    c = fixed(x)
    assert None not in fixed._by_batch and len(c["boxes"]) == len(x)
    assert torch.equal(c["boxes"], b["boxes"])
    for key in ("global", "local", "fusion", "heatmap"):
        assert torch.allclose(c[key], b[key], atol=1e-4), key


def test_explain_gives_heat_map_crop_box_and_branch_cams(agcnn_bundle, nih_images, tmp_path):
    import json

    from chestdx.explain.core import explain
    from chestdx.explain.run import explain_files
    from chestdx.inference import Predictor

    predictor = Predictor(agcnn_bundle)
    x = _batch(predictor, nih_images[:2])
    targets = ["Pneumonia", "global:Pneumonia", "local:Pneumonia"]
    result = explain(predictor.model, x, "gradcam", targets, predictor.explain_heads)
    assert result.target_names == targets
    with torch.no_grad():
        boxes = predictor.model(x)["boxes"].int().tolist()
    local = result.maps[:, 2]
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        outside = np.ones(local[k].shape, bool)
        outside[y0:y1, x0:x1] = False
        assert not local[k][outside].any()  # the local branch's CAM lies inside its crop
    native = explain(predictor.model, x, "native", "predicted", predictor.explain_heads).maps[:, 0]
    heat = predictor.model(x)["heatmap"].detach().numpy()
    assert np.allclose(native, heat, atol=1e-5)  # the native map is the global heat map H_g
    records = explain_files(agcnn_bundle, nih_images[:1], tmp_path / "out", method="gradcam", targets=targets)
    assert [r["target"] for r in records] == targets
    assert records[0]["model_crop_box"] == [float(v) for v in boxes[0]]
    assert isinstance(records[0]["prediction"], list)
    assert json.loads((tmp_path / "out" / "explanations.json").read_text())[0]["model_crop_box"] is not None
    assert (tmp_path / "out" / records[0]["overlay"]).stat().st_size > 0


def test_service_returns_the_crop_box(agcnn_bundle, nih_images, tmp_path):
    from fastapi.testclient import TestClient

    from chestdx.serve.app import ServiceSettings, create_app

    settings = ServiceSettings(models_dir=agcnn_bundle.parent, db_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                               cache_dir=tmp_path / "cache", auth=False)
    with TestClient(create_app(settings)) as client:
        card = client.get("/api/v1/models").json()["models"][0]
        assert card["backend"] == "onnxruntime"  # exported as two graphs, served without the crop's Python model
        r = client.post("/api/v1/predict", files={"file": ("x.jpg", nih_images[0].read_bytes(), "image/jpeg")})
        assert r.status_code == 200, r.text
        body = r.json()
    crop = body["crop_box"]
    assert crop["grid"] == [64, 64] and 0 <= crop["x0"] < crop["x1"] <= 64 and 0 <= crop["y0"] < crop["y1"] <= 64
    assert set(body["probabilities"]) == set(CXR14_LABELS) and isinstance(body["threshold"], dict)
    assert {"global", "local"} <= set(body) and body["heatmap"]["target"] is not None


def test_checkpoint_score_leaves_out_labels_with_few_positives():
    rng = np.random.default_rng(0)
    y = np.zeros((60, 2))
    y[:12, 0] = 1  # A: 12 positives
    y[[20, 40], 1] = 1  # B: 2 positives, ranked perfectly below
    p = np.column_stack([np.where(y[:, 0] > 0, 0.6, 0.4) + rng.normal(0, 0.15, 60), y[:, 1] * 0.9 + 0.05])
    head = Head("x", "multilabel", ("A", "B"), output="x")
    auc_a = multilabel_metrics(y, p, None, ("A", "B"), [0.5, 0.5])["per_label"]["A"]["auc"]
    assert head.score(y, p) == pytest.approx(auc_a)  # B's AUC of 1.0 from 2 positives does not count
    assert get_task("multilabel").score(y, p, min_positives=1) == pytest.approx((auc_a + 1.0) / 2)
