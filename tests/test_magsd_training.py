"""MAG-SD training and multi-class evaluation: the training step's wiring, configs with a base,
cross-validation folds, and one end-to-end run on a small real cxr-covid subset."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chestdx.data.splits import kfold_split_tags
from chestdx.errors import ChestDxError
from chestdx.evaluate.run import per_source
from chestdx.models.magsd import soft_distance_loss
from chestdx.models.magsd_augment import augment
from chestdx.train.config import load_config
from chestdx.train.module import ChestDxModule
from tests.test_cli import run

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def magsd_module(**magsd) -> ChestDxModule:
    cfg = load_config(ROOT / "configs" / "magsd_cxr.yaml", ["model.pretrained=null", "model.n_maps=4"])
    cfg["method"].update(magsd)
    torch.manual_seed(0)
    return ChestDxModule(cfg).eval()  # eval: no dropout, fixed BN, so passes can be recomputed


def magsd_losses(module: ChestDxModule, x, y) -> dict:
    """The registered MAG-SD method's training losses for one batch."""
    return module.method.losses(module.model, {"image": x, "targets": {"diagnosis": y}}, None)


def test_ablation_configs_change_one_thing_of_the_proposed_model():
    proposed = load_config(ROOT / "configs" / "magsd_cxr.yaml")
    l2 = load_config(ROOT / "configs" / "magsd_cxr_l2.yaml")
    assert l2["method"]["regularization"] == "l2" and proposed["method"]["regularization"] == "soft"
    assert {k: v for k, v in l2.items() if k not in ("name", "method")} == \
        {k: v for k, v in proposed.items() if k not in ("name", "method")}
    assert load_config(ROOT / "configs" / "magsd_cxr_aug_none.yaml")["method"]["augmentations"] == []
    assert load_config(ROOT / "configs" / "magsd_cxr_scales_7_14_28.yaml")["model"]["scales"] == [7, 14, 28]
    plain = load_config(ROOT / "configs" / "cxr_plain.yaml")
    assert "scales" not in plain["model"] and plain["method"] == {}  # replaced, not merged
    assert plain["preprocess"] == proposed["preprocess"]


def test_a_config_whose_base_refers_back_to_itself_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ChestDxError, match="refers back"):
        load_config(tmp_path / "a.yaml")


def test_magsd_step_is_cross_entropy_without_augmentations():
    module = magsd_module(augmentations=[])
    x, y = torch.randn(4, 1, 64, 64), torch.tensor([0, 1, 2, 1])
    loss = magsd_losses(module, x, y)["loss"]
    assert torch.allclose(loss, F.cross_entropy(module.model(x)["logits"], y), atol=1e-6)


def test_magsd_step_regularizes_each_augmented_pass_made_from_the_raw_attention():
    module = magsd_module(augmentations=["mixup", "dimming"], regularization="soft")
    x, y = torch.randn(4, 1, 64, 64), torch.tensor([0, 1, 2, 1])
    torch.manual_seed(3)
    got = magsd_losses(module, x, y)
    torch.manual_seed(3)
    raw = module.model(x)
    images = augment(x, raw["attention"], ["mixup", "dimming"])
    want = soft_distance_loss(raw["logits"], [module.model(v)["logits"] for v in images.values()], y)
    assert torch.allclose(got["loss"], want["loss"], atol=1e-5)
    assert got["loss_reg"] > 0


def test_one_augmentation_per_step_runs_two_passes_instead_of_four():
    calls = []
    for per_step in (0, 1):
        module = magsd_module(augment_per_step=per_step)
        hook = module.model.classifier.register_forward_hook(lambda *_: calls.append(per_step))
        magsd_losses(module, torch.randn(2, 1, 64, 64), torch.tensor([0, 2]))
        hook.remove()
    assert calls.count(0) == 4 and calls.count(1) == 2


def test_kfold_tags_test_every_image_once_and_never_split_a_patient():
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(60), 2)
    labels = np.repeat(rng.integers(0, 3, 60), 2)
    folds = kfold_split_tags(labels, patients, n_splits=5)
    tested = np.sum([tags == "test" for tags in folds], axis=0)
    assert (tested == 1).all()
    for tags in folds:
        assert {"train", "val", "test"} == set(tags)
        for p in np.unique(patients):
            assert len(set(tags[patients == p])) == 1


def test_per_source_recall_by_hand():
    split = {"y": np.array([2, 2, 0, 1, 1]), "sources": ["a", "a", "b", "b", "b"],
             "prob": np.eye(3)[[2, 0, 0, 1, 0]].astype(float)}
    out = per_source(split, ["normal", "pneumonia", "covid"])
    assert out["a"] == {"n": 2, "accuracy": 0.5, "by_class": {"covid": {"n": 2, "recall": 0.5}}}
    assert out["b"]["accuracy"] == pytest.approx(2 / 3)
    assert out["b"]["by_class"]["pneumonia"] == {"n": 2, "recall": 0.5}


def test_magsd_trains_evaluates_and_predicts_on_real_radiographs(tmp_path, cxr_covid_dir):
    run_dir, home = tmp_path / "run", tmp_path / "home"
    run(["train", "--config", "configs/magsd_cxr.yaml", "--run-dir", str(run_dir), "--install",
         "--set", "train.epochs=1", "--set", "train.limit_per_split=24", "--set", "train.batch_size=8",
         "--set", "preprocess.size=64", "--set", "evaluate.bootstrap=20", "--set", "model.pretrained=null"], home)
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["task"] == "multiclass" and metrics["classes"] == ["normal", "pneumonia", "covid"]
    assert metrics["n_test"] == 308
    assert np.sum(metrics["test"]["confusion_matrix"]) == 308
    assert set(metrics["test_by_source"]) == {"hannover", "ieee8023", "nih"}
    report = (run_dir / "eval" / "report.md").read_text()
    assert "Per source" in report and (run_dir / "eval" / "confusion.png").stat().st_size > 1000
    image = cxr_covid_dir / "images" / "hannover"
    image = sorted(image.glob("*.jpg"))[0]
    out = json.loads(run(["predict", str(image)], home).stdout)[0]
    probs = out["probabilities"]
    assert set(probs) == {"normal", "pneumonia", "covid"}
    assert sum(probs.values()) == pytest.approx(1, abs=1e-4)
    assert out["prediction"] == max(probs, key=probs.get)


def test_service_serves_a_three_class_model_with_attention_heat_maps(tmp_path, cxr_covid_dir):
    from fastapi.testclient import TestClient

    from chestdx.inference import Predictor
    from chestdx.models.bundle import make_bundle, save_bundle
    from chestdx.serve.app import ServiceSettings, create_app

    cfg = load_config(ROOT / "configs" / "magsd_cxr.yaml", ["preprocess.size=64", "model.pretrained=null"])
    module = magsd_module()
    cfg["model"]["n_maps"] = 4
    models = tmp_path / "models"
    save_bundle(make_bundle(module.model, cfg, validation={"auc": 0.5}), models / "magsd-tiny.pt")
    image = sorted((cxr_covid_dir / "images" / "nih").glob("*.jpg"))[0]
    settings = ServiceSettings(models_dir=models, db_url=f"sqlite:///{tmp_path / 'db.sqlite'}", cache_dir=tmp_path / "c",
                               auth=False)  # loopback test client: the local administrator
    with TestClient(create_app(settings)) as client:
        card = client.get("/api/v1/models").json()["models"][0]
        assert card["classes"] == ["normal", "pneumonia", "covid"] and "normal / pneumonia / covid" in card["intended_use"]
        res = client.post("/api/v1/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")})
        assert res.status_code == 200, res.text
        body = res.json()
    reference = Predictor(models / "magsd-tiny.pt").predict_source(image)
    assert body["probabilities"] == pytest.approx(reference["probabilities"], abs=1e-4)
    assert sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert body["prediction"] == max(body["probabilities"], key=body["probabilities"].get)
    assert body["threshold"] is None and body["heatmap"]["target"] == body["prediction"]
