"""Closed-form CAM, Grad-CAM and Grad-CAM++ from an ONNX graph's feature maps equal `explain` on the
PyTorch bundle; heads that are not GAP + linear of the target layer get no closed form."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chestdx.data.io import read_image
from chestdx.explain import explain
from chestdx.explain.closed_form import (closed_form_check, closed_form_maps, closed_form_spec, explain_outputs,
                                         heatmaps_from_outputs, target_layers)
from chestdx.export import cam_weights_path, export_onnx, load_onnx
from chestdx.inference import Predictor
from chestdx.models import create_model, get_entry
from chestdx.models.bundle import make_bundle, save_bundle
from chestdx.models.ensemble import Ensemble
from chestdx.tasks import Head

REPO = Path(__file__).resolve().parents[1]
METHODS = ("cam", "gradcam", "gradcam++")
BINARY = [Head("diagnosis", "binary", ("neg", "pos"))]


def _images(covid_ct_dir, n=4):
    return sorted((covid_ct_dir / "images").rglob("*.png"))[::97][:n]


def _batch(predictor, paths):
    return torch.cat([predictor.preprocess(read_image(p).to_gray()) for p in paths])


@pytest.fixture(scope="module")
def tiny_export(tiny_models_dir, tmp_path_factory):
    bundle = tiny_models_dir / "ladnn-tiny.pt"
    return bundle, export_onnx(bundle, tmp_path_factory.mktemp("onnx") / "ladnn.onnx")


def _assert_maps_agree(got: np.ndarray, want: np.ndarray, tol: float = 1e-3) -> None:
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tol
    # Argmax locations agree: each one's peak is a peak of the other (bilinear upsampling of a small
    # grid gives plateaus of equal values, so the first index of the max is not unique).
    for g, w in zip(got.reshape(-1, *got.shape[-2:]), want.reshape(-1, *want.shape[-2:])):
        assert w.flat[g.argmax()] >= w.max() - tol and g.flat[w.argmax()] >= g.max() - tol


@pytest.mark.parametrize("method", METHODS)
def test_closed_form_from_onnx_equals_explain_on_real_images(tiny_export, covid_ct_dir, method):
    bundle, onnx_path = tiny_export
    torch_p, onnx_p = Predictor(bundle), Predictor(onnx_path)
    assert onnx_p.model.cam_spec is not None
    x = _batch(torch_p, _images(covid_ct_dir))
    heads = torch_p.explain_heads
    for target in ("predicted", "all"):  # 'all': both binary columns (-l/2, l/2) and the five lesions
        want = explain(torch_p.model, x, method, target, heads)
        got = onnx_p.model.explain(x, method, target)
        np.testing.assert_array_equal(got.columns, want.columns)
        assert got.target_names == want.target_names and got.names == want.names
        np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-5)
        _assert_maps_agree(got.maps, want.maps)
        assert got.maps.shape == (len(x), len(want.target_names), 64, 64)
    # Not a trivial agreement: most maps have structure (a peak and a floor; the rest are zero where
    # the ReLU of Grad-CAM Eq. 2 leaves nothing, in both), and the negative class's map is not the positive's.
    spread = np.ptp(want.maps.reshape(len(x), want.maps.shape[1], -1), axis=-1)
    assert (spread > 0.5).mean() >= 0.5 and ((spread > 0.5) | (spread == 0)).all()
    assert np.abs(want.maps[:, 0] - want.maps[:, 1]).max() > 0.1


def test_heatmaps_from_outputs_is_the_service_call(tiny_export, covid_ct_dir):
    bundle, onnx_path = tiny_export
    torch_p, onnx_p = Predictor(bundle), Predictor(onnx_path)
    x = _batch(torch_p, _images(covid_ct_dir, 2))
    out = onnx_p.model(x, features=True)
    heat = heatmaps_from_outputs(out, onnx_p.model.cam_spec, "gradcam++")
    want = explain(torch_p.model, x, "gradcam++", "predicted", torch_p.explain_heads).maps
    _assert_maps_agree(heat, want)
    # The same from the spec and explicit columns: the positive class's column of the binary pair.
    spec = onnx_p.model.cam_spec
    cols = np.ones((len(x), 1), dtype=int)
    direct = closed_form_maps(out, spec, cols, "gradcam", input_hw=(64, 64))
    _assert_maps_agree(direct, explain(torch_p.model, x, "gradcam", "covid", torch_p.explain_heads).maps)


def test_export_keeps_outputs_and_matches_pytorch_logits(tiny_export, covid_ct_dir):
    bundle, onnx_path = tiny_export
    meta = json.loads(onnx_path.with_suffix(".json").read_text())
    assert meta["outputs"] == ["logits", "lesion_logits"]  # unchanged
    assert meta["cam"]["features"] == ["cam_features"] and meta["cam"]["file"] == "ladnn.cam.npz"
    assert cam_weights_path(onnx_path).is_file() and meta["cam"]["input_hw"] == [64, 64]
    assert [h["name"] for h in meta["cam"]["heads"]] == ["diagnosis", "lesions"]
    torch_p, onnx_p = Predictor(bundle), Predictor(onnx_path)
    x = _batch(torch_p, _images(covid_ct_dir, 6))
    with torch.no_grad():
        expected = torch_p.model(x)
    plain = onnx_p.model(x)
    assert set(plain) == {"logits", "lesion_logits"}  # callers that iterate over the outputs see no features
    full = onnx_p.model(x, features=True)
    assert set(full) == {"logits", "lesion_logits", "cam_features"}
    assert full["cam_features"].shape == (6, 320, 2, 2)  # EfficientNet-Lite0's last stage at 64 px
    for key in ("logits", "lesion_logits"):
        assert torch.allclose(plain[key], expected[key], atol=1e-4)
        assert torch.equal(plain[key], full[key])
    # The features are the PyTorch target layer's output.
    feats = []
    hook = torch_p.model.target_layer().register_forward_hook(lambda m, i, o: feats.append(o.detach()))
    with torch.no_grad():
        torch_p.model(x)
    hook.remove()
    assert torch.allclose(full["cam_features"], feats[0], atol=1e-4)
    probs = onnx_p.predict_tensor(x)
    want = torch_p.predict_tensor(x)
    for name in want:
        np.testing.assert_allclose(probs[name], want[name], atol=1e-5)
    assert onnx_p.describe({k: v[0] for k, v in probs.items()})["prediction"] in ("noncovid", "covid")


def test_sessions_for_one_image_answer_as_the_dynamic_ones(tiny_export, covid_ct_dir):
    """The service's batch-of-one graphs (shape arithmetic folded away) give the dynamic graphs' outputs,
    features included; a call with another batch size still works (on dynamic sessions built for it)."""
    _, onnx_path = tiny_export
    dynamic, single = load_onnx(onnx_path)[0], load_onnx(onnx_path, batch=1)[0]
    x = _batch(Predictor(onnx_path), _images(covid_ct_dir, 4))
    for k in range(len(x)):
        want, got = dynamic(x[k:k + 1], features=True), single(x[k:k + 1], features=True)
        assert set(got) == set(want) == {"logits", "lesion_logits", "cam_features"}
        for key in want:
            assert torch.allclose(got[key], want[key], atol=1e-5)
    assert None not in single._by_batch  # no dynamic session until a call needs one
    whole = single(x, features=True)
    assert None in single._by_batch
    assert torch.allclose(whole["logits"], dynamic(x)["logits"], atol=1e-5)
    with pytest.raises(Exception):  # the fixed graphs really are fixed: a batch of 4 is refused by them
        single.sessions[0][0].run(["logits"], {"image": x.numpy()})
    # a batch over half full (4 of 5) is padded to the fixed size, and only its own rows come back;
    # one under half (2 of 5) runs on dynamic sessions instead
    five = load_onnx(onnx_path, batch=5)[0]
    padded = five(x, features=True)
    assert None not in five._by_batch and padded["cam_features"].shape[0] == 4
    for key, value in dynamic(x, features=True).items():
        assert torch.allclose(padded[key], value, atol=1e-5)
    assert torch.allclose(five(x[:2])["logits"], dynamic(x[:2])["logits"], atol=1e-5) and None in five._by_batch


def test_export_without_features_and_a_missing_weights_file(tiny_models_dir, tmp_path, covid_ct_dir):
    bundle = tiny_models_dir / "ladnn-tiny.pt"
    off = export_onnx(bundle, tmp_path / "off.onnx", with_features=False)
    meta = json.loads(off.with_suffix(".json").read_text())
    assert "cam" not in meta and not cam_weights_path(off).exists()
    model, _ = load_onnx(off)
    assert model.cam_spec is None and set(model(torch.zeros(1, 1, 64, 64), features=True)) == {"logits",
                                                                                                "lesion_logits"}
    on = export_onnx(bundle, tmp_path / "on.onnx", with_features=True)
    cam_weights_path(on).unlink()  # copied without its weights: predictions still served, heat maps not
    model, _ = load_onnx(on)
    assert model.cam_spec is None and set(model(torch.zeros(1, 1, 64, 64))) == {"logits", "lesion_logits"}
    with pytest.raises(Exception, match="no closed-form CAM"):
        model.explain(torch.zeros(1, 1, 64, 64))


def test_spec_reads_the_head_from_the_module_structure():
    torch.manual_seed(0)
    heads = get_entry("ladnn").heads
    lite = create_model("ladnn", backbone="efficientnet_lite0").eval()
    spec = closed_form_spec(lite, heads)
    member = spec["members"][0]
    # blocks.6 -> conv_head (1x1) -> bn2 (BN + ReLU6) -> GAP -> dropout -> linear: one folded affine map + ReLU6.
    assert [p["op"] for p in member["pointwise"]] == ["affine", "act"] and member["pointwise"][1]["name"] == "relu6"
    assert member["pointwise"][0]["weight"].shape == (1280, 320)
    np.testing.assert_allclose(member["outputs"]["logits"]["weight"], lite.covid_head.weight[0].detach().numpy())
    assert member["outputs"]["lesion_logits"]["weight"].shape == (5, 1280)
    resnet = create_model("ladnn", backbone="resnet18").eval()
    member = closed_form_spec(resnet, heads)["members"][0]
    assert member["pointwise"] == []  # layer4 is pooled directly: the gradient is w_ck / hw
    np.testing.assert_allclose(member["outputs"]["logits"]["bias"], resnet.covid_head.bias.detach().numpy()[0])


class _HandMade(nn.Module):
    """conv -> ReLU features; a head chosen by `head`."""

    heads = BINARY

    def __init__(self, head: str):
        super().__init__()
        torch.manual_seed(1)
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.kind = head
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.linear = nn.Linear(8, 1)
        self.attend = nn.Conv2d(8, 1, 1)
        self.norm = nn.BatchNorm2d(8).eval()
        with torch.no_grad():
            self.norm.running_mean.uniform_(-0.2, 0.2)
            self.norm.running_var.uniform_(0.5, 2.0)
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        a = self.features(x)
        if self.kind == "gap_linear":  # the flatten(2).mean(-1) way of pooling, then 3 * linear - 1
            return {"logits": 3 * self.linear(a.flatten(2).mean(-1)).squeeze(-1) - 1}
        if self.kind == "bn_silu":  # a diagonal affine map and a smooth activation before the pool
            return {"logits": self.linear(F.silu(self.norm(a)).mean((2, 3))).squeeze(-1)}
        if self.kind == "mlp":
            return {"logits": self.mlp(a.mean((2, 3))).squeeze(-1)}
        if self.kind == "attention":  # softmax spatial attention pooling: weights depend on A
            w = torch.softmax(self.attend(a).flatten(2), dim=-1)
            return {"logits": self.linear((a.flatten(2) * w).sum(-1)).squeeze(-1)}
        if self.kind == "max":
            return {"logits": self.linear(a.amax((2, 3))).squeeze(-1)}
        raise ValueError(self.kind)

    def target_layer(self):
        return self.features


@pytest.mark.parametrize("head, reason", [("mlp", "not linear"), ("attention", "softmax"),
                                          ("max", "amax")])
def test_heads_that_are_not_gap_linear_get_none(head, reason):
    spec, why = closed_form_check(_HandMade(head), BINARY)
    assert spec is None and reason in why


def test_registered_models_without_the_form_get_none():
    torch.manual_seed(0)
    att2 = create_model("att2", backbone="efficientnet_lite0").eval()  # attention-weighted pooling
    assert closed_form_spec(att2, get_entry("att2").heads) is None
    agcnn = create_model("agcnn", backbone="resnet18").eval()  # per-branch layers, crops
    assert closed_form_spec(agcnn, get_entry("agcnn").heads) is None
    vgg = create_model("ladnn", backbone="vgg16").eval()  # a 7x7-conv MLP between the layer and the pool
    spec, why = closed_form_check(vgg, get_entry("ladnn").heads)
    assert spec is None and "pre_logits" in why


@pytest.mark.parametrize("kind", ["gap_linear", "bn_silu"])
def test_hand_made_gap_linear_matches_explain(kind):
    model = _HandMade(kind).eval()
    spec = closed_form_spec(model, BINARY)
    assert spec is not None
    if kind == "gap_linear":
        assert spec["members"][0]["pointwise"] == []
        np.testing.assert_allclose(spec["members"][0]["outputs"]["logits"]["weight"],
                                   3 * model.linear.weight[0].detach().numpy(), rtol=1e-6)
    else:
        assert [p["op"] for p in spec["members"][0]["pointwise"]] == ["affine", "act"]
    x = torch.rand(3, 1, 48, 48)
    out = _outputs(model, x, spec)
    for method in METHODS:
        for target in ("predicted", "neg", "pos"):
            _assert_maps_agree(explain_outputs(out, spec, method, target, input_hw=(48, 48)).maps,
                               explain(model, x, method, target, BINARY).maps)


def _outputs(model, x, spec):
    feats = []
    hooks = [layer.register_forward_hook(lambda m, i, o: feats.append(o.detach())) for layer in target_layers(model)]
    with torch.no_grad():
        out = dict(model(x))
    for h in hooks:
        h.remove()
    out.update({m["feature"]: f for m, f in zip(spec["members"], feats)})
    return out


def test_ensemble_from_onnx_equals_explain(tmp_path, covid_ct_dir):
    """A mean of member probabilities: each member's gradient is its own image-dependent factor times
    its weights; the maps are the members' maps averaged, as pytorch-grad-cam averages its layers."""
    from chestdx.train.config import load_config

    cfg = load_config(REPO / "configs" / "ladnn_covidct.yaml", ["preprocess.size=64", "train.ensemble=2"])
    torch.manual_seed(0)
    members = [create_model("ladnn", backbone="efficientnet_lite0").eval() for _ in range(2)]
    with torch.no_grad():  # members that disagree, so the per-member factors differ
        members[1].covid_head.weight.mul_(-3)
    ensemble = Ensemble(members, get_entry("ladnn").heads).eval()
    path = save_bundle(make_bundle(ensemble, cfg), tmp_path / "ens.pt")
    onnx_path = export_onnx(path, tmp_path / "ens.onnx")
    torch_p, onnx_p = Predictor(path), Predictor(onnx_path)
    assert onnx_p.model.cam_spec["ensemble"] and onnx_p.model.feature_names == ["cam_features_0", "cam_features_1"]
    x = _batch(torch_p, _images(covid_ct_dir, 3))
    for method in METHODS:
        want = explain(torch_p.model, x, method, "all", torch_p.explain_heads)
        got = onnx_p.model.explain(x, method, "all")
        np.testing.assert_array_equal(got.columns, want.columns)
        _assert_maps_agree(got.maps, want.maps)


def test_multiclass_ensemble_matches_explain():
    torch.manual_seed(0)
    heads = get_entry("cxr_plain").heads
    members = [create_model("cxr_plain", backbone="resnet18").eval() for _ in range(2)]
    ensemble = Ensemble(members, heads).eval()
    spec = closed_form_spec(ensemble, heads)
    x = torch.randn(2, 1, 64, 64)
    out = _outputs(ensemble, x, spec)
    for method in METHODS:
        _assert_maps_agree(explain_outputs(out, spec, method, "classes", input_hw=(64, 64)).maps,
                           explain(ensemble, x, method, "classes", heads).maps)


def test_time_closed_form_and_pytorch_at_224_px(tmp_path, covid_ct_dir):
    """Printed, not asserted: one 224 px image, Grad-CAM++ on the LA-DNN (EfficientNet-Lite0)."""
    from chestdx.models import LADNN
    from chestdx.train.config import load_config

    cfg = load_config(REPO / "configs" / "ladnn_covidct.yaml", ["preprocess.size=224"])
    torch.manual_seed(0)
    path = save_bundle(make_bundle(LADNN(pretrained=None).eval(), cfg), tmp_path / "m224.pt")
    onnx_path = export_onnx(path, tmp_path / "m224.onnx")
    torch_p, onnx_p = Predictor(path), Predictor(onnx_path)
    x = _batch(torch_p, _images(covid_ct_dir, 1))

    def best(fn, n=5):
        times = []
        for _ in range(n):
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
        return min(times) * 1000, result

    t_pt, want = best(lambda: explain(torch_p.model, x, "gradcam++", "predicted", torch_p.explain_heads).maps)
    t_onnx, _ = best(lambda: onnx_p.model(x))
    t_both, got = best(lambda: onnx_p.model.explain(x, "gradcam++", "predicted").maps)
    out = onnx_p.model(x, features=True)
    t_maps, _ = best(lambda: heatmaps_from_outputs(out, onnx_p.model.cam_spec, "gradcam++"))
    _assert_maps_agree(got, want)
    print(f"\n224 px Grad-CAM++: PyTorch explain {t_pt:.1f} ms; ONNX forward {t_onnx:.1f} ms; "
          f"ONNX forward with features + closed form {t_both:.1f} ms (closed form alone {t_maps:.1f} ms)")
