import cv2
import numpy as np
import pytest
import torch

from chestdx.errors import ChestDxError
from chestdx.models import create_backbone, create_model, get_entry, list_models
from chestdx.models.bundle import load_bundle, make_bundle, save_bundle
from chestdx.train.config import load_config

# ImageNet classes: 281-285 are domestic cats, 967 espresso, 968 cup.
CATS, COFFEE = set(range(281, 286)), {967, 968}


@pytest.fixture(scope="module")
def lite0_rgb():
    return create_backbone("efficientnet_lite0", in_chans=3, pretrained="imagenet", num_classes=1000).eval()


def _photo(name, size=224):
    from skimage import data

    img = cv2.resize(getattr(data, name)(), (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    return torch.from_numpy((img - 0.5) / 0.5).permute(2, 0, 1)[None]


@pytest.mark.parametrize("photo,classes", [("chelsea", CATS), ("coffee", COFFEE)])
def test_packaged_imagenet_weights_classify_natural_photos(lite0_rgb, photo, classes):
    """The efficientnet-lite0 package's tensors, mapped onto timm's tf_efficientnet_lite0."""
    with torch.no_grad():
        top = lite0_rgb(_photo(photo)).softmax(-1)[0]
    assert int(top.argmax()) in classes
    assert float(top[list(classes)].sum()) > 0.5


@pytest.mark.parametrize("name,size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_larger_lite_packages_classify_natural_photos(name, size):
    """lite1 and lite2 packages (deeper stages, same naming) mapped onto timm's tf_efficientnet_lite1/2."""
    model = create_backbone(name, in_chans=3, pretrained="imagenet", num_classes=1000).eval()
    with torch.no_grad():
        for photo, classes in (("chelsea", CATS), ("coffee", COFFEE)):
            top = model(_photo(photo, size)).softmax(-1)[0]
            assert int(top.argmax()) in classes, (name, photo)
            assert float(top[list(classes)].sum()) > 0.5, (name, photo)


def test_random_init_does_not_classify_photos():
    model = create_backbone("efficientnet_lite0", in_chans=3, pretrained=None, num_classes=1000).eval()
    with torch.no_grad():
        top = model(_photo("chelsea")).softmax(-1)[0]
    assert float(top[list(CATS)].sum()) < 0.05


def test_grey_stem_equals_rgb_on_replicated_grey(lite0_rgb):
    grey = create_backbone("efficientnet_lite0", in_chans=1, pretrained="imagenet", num_classes=1000).eval()
    x = torch.randn(1, 1, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), lite0_rgb(x.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(ChestDxError, match="no local ImageNet weights for backbone 'resnet50'"):
        create_backbone("resnet50", pretrained="imagenet")
    with pytest.raises(ChestDxError, match="weight file not found"):
        create_backbone("resnet18", pretrained=tmp_path / "missing.pth")
    with pytest.raises(ChestDxError, match="unknown backbone"):
        create_backbone("alexnet")


@pytest.mark.parametrize("backbone", ["efficientnet_b0", "resnet18", "resnet50", "densenet121", "densenet169",
                                      "vgg16"])
def test_backbones_take_grey_input(backbone):
    model = create_model("ladnn", backbone=backbone, pretrained=None).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64))
    assert out["logits"].shape == (2,) and out["lesion_logits"].shape == (2, 5)


def test_registry_metadata():
    assert {"ladnn", "covid_baseline"} <= set(list_models())
    entry = get_entry("ladnn")
    assert entry.classes == ("noncovid", "covid") and entry.primary == "diagnosis"
    assert [(h.name, h.task, len(h.labels)) for h in entry.heads] == [("diagnosis", "binary", 2), ("lesions", "multilabel", 5)]
    assert entry.method == "ladnn" and "n_lesions" not in entry.options()  # fixed by the entry, not an option
    baseline = create_model("covid_baseline", backbone="resnet18")
    assert baseline.lesion_head is None and "lesion_logits" not in baseline(torch.randn(1, 1, 64, 64))
    with pytest.raises(ChestDxError, match="unknown model"):
        get_entry("nope")


def test_bundle_round_trip(tmp_path):
    cfg = load_config(None, ["model.backbone=resnet18", "model.pretrained=none"])
    model = create_model("ladnn", backbone="resnet18").eval()
    bundle = make_bundle(model, cfg, data_fingerprint="abc", validation={"auc": 0.9})
    bundle["thresholds"] = {"diagnosis": [0.42]}
    path = save_bundle(bundle, tmp_path / "m.pt")
    loaded, meta = load_bundle(path)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["logits"], model(x)["logits"])
    assert meta["thresholds"] == {"diagnosis": [0.42]} and meta["data_fingerprint"] == "abc"
    assert [h["name"] for h in meta["heads"]] == ["diagnosis", "lesions"] and meta["primary"] == "diagnosis"
    assert meta["classes"] == ["noncovid", "covid"] and meta["preprocess"]["mean"] == pytest.approx(0.449, abs=1e-3)
    assert meta["config"]["model"]["backbone"] == "resnet18"
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ChestDxError, match="not a readable chestdx model"):
        load_bundle(tmp_path / "junk.pt")


def test_predictor_averages_the_configured_test_views(tmp_path):
    from chestdx.data.transforms import tta_views
    from chestdx.inference import Predictor

    cfg = load_config(None, ["model.backbone=resnet18", "model.pretrained=none", "evaluate.tta_scales=[1.0,0.8]"])
    torch.manual_seed(0)
    model = create_model("ladnn", backbone="resnet18").eval()
    predictor = Predictor(save_bundle(make_bundle(model, cfg), tmp_path / "m.pt"))
    assert predictor.tta and predictor.tta_scales == [1.0, 0.8]
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        views = tta_views(x, True, [1.0, 0.8])
        expected = torch.stack([torch.sigmoid(model(v)["logits"]) for v in views]).mean(0)
        mirror_only = torch.stack([torch.sigmoid(model(v)["logits"]) for v in views[:2]]).mean(0)
    got = predictor.predict_tensor(x)["diagnosis"]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
    assert not np.allclose(got, mirror_only.numpy(), atol=1e-6)  # the 0.8 views count


def test_freeze_stages_trains_only_later_layers():
    from chestdx.models.backbones import frozen_modules
    from chestdx.train.module import ChestDxModule

    cfg = load_config(None, ["model.pretrained=none", "train.freeze_stages=2"])
    module = ChestDxModule(cfg).train()
    backbone = module.model.backbone
    assert frozen_modules(backbone, 2) == ["conv_stem", "bn1", "blocks.0", "blocks.1"]
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    out = module(torch.randn(4, 1, 64, 64))
    F = torch.nn.functional
    F.binary_cross_entropy_with_logits(out["logits"], torch.tensor([0.0, 1, 0, 1])).backward()
    opt.step()
    after = module.model.state_dict()
    for name in ("backbone.conv_stem.weight", "backbone.blocks.1.0.conv_pw.weight", "backbone.bn1.weight"):
        torch.testing.assert_close(after[name], before[name])  # frozen: not trained
    for name in ("backbone.blocks.2.0.conv_pw.weight", "covid_head.weight"):
        assert not torch.equal(after[name], before[name])  # later layers and the head train
    # frozen batch norms still adapt their running statistics to the new images
    assert not torch.equal(after["backbone.bn1.running_mean"], before["backbone.bn1.running_mean"])
    with pytest.raises(ChestDxError, match="cannot freeze 9 stages"):
        frozen_modules(backbone, 9)
