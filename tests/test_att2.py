"""ResNet50-ATT2 (Eq. 7-12) and the Bi-LSTM sequence model (Eq. 1-6): hand computations, the frozen
stage-1 extractor, slice sequences from series, and where the sequence attention goes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from chestdx.data.dataset import SequenceReader, reader_for
from chestdx.errors import ChestDxError, InputError
from chestdx.models import create_model
from chestdx.models.att2 import AttentionModule
from chestdx.models.seqattn import SequenceAttention
from chestdx.tasks import balanced_class_weights, get_task
from tests.toy import train_toy_sequence_model, write_toy_dataset
from tests.test_volumes import write_series


def _softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def _module(compatibility: str, seed: int = 0) -> tuple[AttentionModule, np.ndarray, np.ndarray]:
    """An attention module on a 2-channel 2x3 map, global feature of width 3, random weights."""
    torch.manual_seed(seed)
    module = AttentionModule(local_dim=2, global_dim=3, compatibility=compatibility)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1, 2, 2, 3)).astype(np.float32)
    g = rng.normal(size=(1, 3)).astype(np.float32)
    return module, x, g


@pytest.mark.parametrize("compatibility", ["additive", "dot"])
def test_attention_module_matches_a_hand_computation(compatibility):
    module, x, g = _module(compatibility)
    attended, attention = module(torch.from_numpy(x), torch.from_numpy(g))
    W_p = module.project.weight.detach().numpy()  # (3, 2)
    local = x[0].reshape(2, -1).T  # x_i, one row per position (6, 2)
    projected = local @ W_p.T  # Eq. 7
    if compatibility == "additive":
        u = module.u.weight.detach().numpy()[0]
        scores = (projected + g[0]) @ u  # Eq. 11
    else:
        scores = projected @ g[0]  # Eq. 12
    a = _softmax(scores)  # Eq. 9
    np.testing.assert_allclose(attention.detach().numpy().reshape(-1), a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(attended.detach().numpy()[0], a @ local, rtol=1e-5, atol=1e-6)  # Eq. 10
    assert attention.shape == (1, 2, 3) and np.isclose(float(attention.detach().sum()), 1.0)


def test_additive_compatibility_ignores_the_global_feature_and_dot_does_not():
    # <u, x_hat_i + g> = <u, x_hat_i> + <u, g>: the same shift at every position, which the softmax removes.
    for compatibility, depends in (("additive", False), ("dot", True)):
        module, x, g = _module(compatibility, seed=3)
        g = torch.from_numpy(g).requires_grad_(True)
        attended, _ = module(torch.from_numpy(x), g)
        attended.sum().backward()
        other, _ = module(torch.from_numpy(x), g.detach() * 3 + 1)
        assert (float(g.grad.abs().max()) > 1e-4) is depends
        assert (not torch.allclose(attended, other, atol=1e-6)) is depends


def test_att2_taps_maps_and_embedding_widths():
    model = create_model("att2", backbone="efficientnet_lite0", pretrained=None).eval()
    x = torch.randn(2, 1, 224, 224)
    maps = model.attention_maps(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(14, 14), (7, 7)]  # the paper's 14 x 14 and 7 x 7
    for m in maps:
        np.testing.assert_allclose(m.flatten(1).sum(1).numpy(), 1.0, rtol=1e-5)  # softmax over positions
    assert model.embedding_dim == 112 + 1280 and model(x)["logits"].shape == (2,)
    combined = model.native_maps(x)
    assert combined.shape == (2, 1, 14, 14) and float(combined.min()) >= 0 and float(combined.max()) <= 1 + 1e-6
    paper = create_model("att2", backbone="resnet50", tail_blocks=3, pretrained=None)
    assert paper.embedding_dim == 3072 and len(paper.tail) == 3  # 1024 + 2048, three more bottlenecks
    with pytest.raises(ChestDxError, match="taps"):
        create_model("att2", taps=[-1, 4], pretrained=None)  # the same stage twice
    final_only = create_model("att2", taps=["final"], pretrained=None).eval()
    assert final_only.embedding_dim == 1280 and [tuple(m.shape[1:]) for m in final_only.attention_maps(x)] == [(7, 7)]


def test_class_weights_inversely_proportional_to_frequency():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2])
    w = balanced_class_weights(y, np.ones_like(y, bool), 3)
    counts = np.bincount(y)
    np.testing.assert_allclose(np.array(w) * counts, len(y) / 3)  # w_c N_c constant
    logits, target = torch.tensor([0.3, -1.2, 2.0, 0.1]), torch.tensor([0, 0, 0, 1])
    wb = [4 / 6, 4 / 2]
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
    expected = (per * torch.tensor([wb[0]] * 3 + [wb[1]])).sum() / (3 * wb[0] + wb[1])
    assert torch.isclose(get_task("binary").loss(logits, target, class_weights=wb), expected)
    ml = torch.randn(4, 3)
    assert torch.isclose(get_task("multiclass").loss(ml, torch.tensor([0, 1, 2, 2]), class_weights=w),
                         torch.nn.functional.cross_entropy(ml, torch.tensor([0, 1, 2, 2]), weight=torch.tensor(w)))


def test_sequence_attention_matches_equations_1_to_4():
    torch.manual_seed(0)
    model = SequenceAttention(extractor={"registry_name": "toy_slice_stats", "model_kwargs": {}}, hidden=4).eval()
    e = torch.randn(1, 6, 2)
    with torch.no_grad():
        context, attention = model.attend(e)
        h, _ = model.lstm(e)
        # h_n: the forward state after the last slice and the backward state after the first
        h_n = torch.cat([h[:, -1, :4], h[:, 0, 4:]], dim=1)
        g = torch.tanh(model.global_proj(h_n))  # Eq. 1
        s = torch.stack([g[0] @ model.score.weight @ h[0, i] for i in range(6)])  # Eq. 2
        a = torch.softmax(s, 0)  # Eq. 3
    torch.testing.assert_close(attention[0], a)
    torch.testing.assert_close(context[0], (a[:, None] * h[0]).sum(0))  # Eq. 4
    assert torch.isclose(attention.sum(), torch.tensor(1.0))


def test_slice_values_attention_finds_the_lesion_slices():
    # Lesion in slices 5-7 of every positive, 200 steps: with the slices pooled the attention must find
    # them (it did for every seed tried); the paper's pooling of hidden states need not (README).
    result = train_toy_sequence_model("slices", seed=0, start=5)
    assert result["accuracy"] > 0.95
    assert result["attention_on_lesion"] > 0.9 and result["peak_on_lesion_rate"] > 0.95


def test_embedding_cache_gives_the_same_output():
    torch.manual_seed(0)
    plain = SequenceAttention(extractor={"registry_name": "toy_slice_stats", "model_kwargs": {}}, hidden=4).eval()
    cached = SequenceAttention(extractor={"registry_name": "toy_slice_stats", "model_kwargs": {}}, hidden=4,
                               embedding_cache=3).eval()
    cached.load_state_dict(plain.state_dict())
    x = torch.rand(5, 6, 8, 8)
    for _ in range(2):  # the second pass reads the cache (3 of 5 kept)
        torch.testing.assert_close(cached(x)["logits"], plain(x)["logits"])
    assert len(cached._cache) == 3


def test_sequence_reader_lung_window_on_a_mediastinal_dicom(tmp_path):
    # Lung tissue (-800 HU) under the file's mediastinal VOI (50 / 350) would be black; the model's
    # lung window (-600 / 1500) puts it mid-range: (-800 + 1350) / 1500.
    def lung(k, ds):
        ds.WindowCenter, ds.WindowWidth = 50, 350
        ds.PixelData = np.full((ds.Rows, ds.Columns), -800 + 1024, np.uint16).tobytes()

    write_series(tmp_path / "s", n=8, edit=lung)
    seq = SequenceReader(length=4, hu_window=(-600, 1500))(tmp_path / "s")
    assert seq.shape == (4, 32, 24)
    np.testing.assert_allclose(seq, 550 / 1500, atol=1e-6)
    with pytest.raises(InputError, match="hu_window"):
        SequenceReader(length=4)(tmp_path / "s")
    # A CT NIfTI stores HU: windowed too; one already in [0, 1] passes unchanged; other modalities are refused.
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.full((24, 32, 8), -800.0, np.float32), np.eye(4)), tmp_path / "hu.nii.gz")
    np.testing.assert_allclose(SequenceReader(length=4, hu_window=(-600, 1500))(tmp_path / "hu.nii.gz"), 550 / 1500,
                               atol=1e-6)
    nib.save(nib.Nifti1Image(np.full((24, 32, 8), 0.25, np.float32), np.eye(4)), tmp_path / "unit.nii.gz")
    np.testing.assert_allclose(SequenceReader(length=4, hu_window=(-600, 1500))(tmp_path / "unit.nii.gz"), 0.25)

    def mr(k, ds):
        ds.Modality = "MR"

    write_series(tmp_path / "mr", n=8, edit=mr)
    with pytest.raises(InputError, match="modality MR is not CT"):
        SequenceReader(length=4, hu_window=(-600, 1500))(tmp_path / "mr")


def test_sequence_reader_draws_16_and_refuses_13(tmp_path):
    from PIL import Image

    for n in (40, 16, 13):
        folder = tmp_path / f"v{n}"
        folder.mkdir()
        for k in range(n):
            Image.fromarray(np.full((20, 24), k * 5, np.uint8)).save(folder / f"{k:03d}.png")
    read = reader_for("sequence", {"size": 24, "resize": "pad", "sequence_length": 16})
    seq40 = read.volume(tmp_path / "v40")
    assert seq40.meta["slice_indices"] == np.floor(np.arange(16) * 39 / 15 + 0.5).astype(int).tolist()
    np.testing.assert_allclose(seq40.array[:, 5, 6] * 255, np.array(seq40.meta["slice_indices"]) * 5, atol=0.6)
    assert read.volume(tmp_path / "v16").meta["slice_indices"] == list(range(16))
    with pytest.raises(InputError, match=r"v13.*13 slices, a 16-slice sequence needs at least 16"):
        read(tmp_path / "v13")


def test_two_stage_training_keeps_the_extractor_frozen(tmp_path):
    from chestdx.data.sequences import compose_sequences, lesion_slices
    from chestdx.data.manifest import Manifest
    from chestdx.inference import Predictor
    from chestdx.models.bundle import load_bundle
    from chestdx.train.config import load_config
    from chestdx.train.run import fit
    from chestdx.settings import REPO_ROOT

    csv = write_toy_dataset(tmp_path / "toy", n=240)
    toy = pd.read_csv(csv)
    toy["label"] = toy["label"].map({"pos": "covid", "neg": "noncovid"})  # the att2 head's labels
    toy.to_csv(csv, index=False)
    common = ["preprocess.size=32", "train.batch_size=16", "train.warmup_epochs=0", "evaluate.bootstrap=50",
              "evaluate.tta=false", "train.num_workers=0"]
    stage1 = load_config(REPO_ROOT / "configs" / "att2_covidct.yaml",
                         [f"dataset={csv}", "model.pretrained=null", "train.epochs=1", *common])
    bundle1 = fit(stage1, tmp_path / "stage1", progress=False)
    seqs = compose_sequences(Manifest.from_csv(csv, classes=("noncovid", "covid")), tmp_path / "seq",
                             per_split={"train": 16, "val": 8, "test": 8}, length=16, run=3)
    frame = pd.read_csv(seqs)
    assert all(len(s) == (3 if y == "covid" else 0)
               for s, y in zip(lesion_slices(Manifest.from_csv(seqs)), frame["label"]))
    stage2 = load_config(REPO_ROOT / "configs" / "att2_bilstm_covidct.yaml",
                         [f"dataset={seqs}", f"model.pretrained={bundle1}", "train.epochs=2", "train.batch_size=8",
                          *common])
    bundle2 = fit(stage2, tmp_path / "stage2", progress=False)
    first, _ = load_bundle(bundle1)
    second, b2 = load_bundle(bundle2)  # rebuilds the extractor from the recorded architecture
    assert b2["model_kwargs"]["extractor"]["registry_name"] == "att2"
    before, after = first.state_dict(), second.extractor.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and batch-norm statistics
    result = Predictor(bundle2).predict_source(tmp_path / "seq" / frame["path"][1])
    assert len(result["slices"]) == 16 and np.isclose(sum(s["attention"] for s in result["slices"]), 1.0)
    # The command line: one result per series, and the Fig. 6 montage.
    from typer.testing import CliRunner

    from chestdx.cli import app

    run = CliRunner().invoke(app, ["predict", str(tmp_path / "seq" / frame["path"][1]), "--checkpoint", str(bundle2),
                                   "--montage", str(tmp_path / "montages"), "--out", str(tmp_path / "p.json")])
    assert run.exit_code == 0, run.output
    rows = __import__("json").loads((tmp_path / "p.json").read_text())
    assert len(rows) == 1 and len(rows[0]["slices"]) == 16 and Path(rows[0]["montage"]).stat().st_size > 1000
    run = CliRunner().invoke(app, ["explain", str(tmp_path / "seq" / frame["path"][1]), "--checkpoint", str(bundle2)])
    # (the installed `chestdx` prints a ChestDxError as one line; in-process it is the exception)
    assert isinstance(run.exception, ChestDxError) and "--montage" in str(run.exception)

    # ONNX export: the logits and the slice attention as PyTorch gives them.
    from chestdx.export import export_onnx

    onnx = Predictor(export_onnx(bundle2, tmp_path / "seq.onnx"))
    from_onnx = onnx.predict_source(tmp_path / "seq" / frame["path"][1])
    assert np.isclose(from_onnx["probabilities"]["covid"], result["probabilities"]["covid"], atol=1e-4)
    np.testing.assert_allclose([s["attention"] for s in from_onnx["slices"]],
                               [s["attention"] for s in result["slices"]], atol=1e-4)
    _service_takes_a_zipped_series(bundle2, tmp_path, tmp_path / "seq" / frame["path"][1], result)

    from chestdx.train.module import ChestDxModule

    other = load_config(REPO_ROOT / "configs" / "att2_bilstm_covidct.yaml",
                        [f"dataset={seqs}", f"model.pretrained={bundle1}", "preprocess.size=48"])
    with pytest.raises(ChestDxError, match="preprocess must match the stage-1 model's.*size: 48 here, 32 in stage 1"):
        ChestDxModule(other)


def _service_takes_a_zipped_series(bundle, tmp_path, series, expected):
    import io
    import shutil
    import zipfile

    from fastapi.testclient import TestClient

    from chestdx.serve.app import ServiceSettings, create_app

    models = tmp_path / "served"
    models.mkdir()
    shutil.copy(bundle, models / "seq.pt")
    settings = ServiceSettings(models_dir=models, db_url=f"sqlite:///{tmp_path / 's.db'}", cache_dir=tmp_path / "c",
                               max_upload_mb=1.0, auth=False)  # a series may unpack to 20 x the upload limit
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(series.iterdir()):
            z.write(f, f"series/{f.name}")
    with TestClient(create_app(settings)) as client:
        r = client.post("/api/v1/predict", files={"file": ("s.zip", buf.getvalue(), "application/zip")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert np.isclose(body["probabilities"]["covid"], expected["probabilities"]["covid"], atol=1e-4)
        assert len(body["slices"]) == 16 and body["montage_png"].startswith("data:image/png;base64,")
        bomb = io.BytesIO()
        with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("a.dcm", b"\0" * (30 * 2**20))  # 30 KB compressed, past the 20 MB unpacked limit
        r = client.post("/api/v1/predict", files={"file": ("bomb.zip", bomb.getvalue(), "application/zip")})
        assert r.status_code == 413 and "too large" in r.json()["error"]["message"]
        r = client.post("/api/v1/predict", files={"file": ("one.png", b"\x89PNG....", "image/png")})
        assert r.status_code == 415 and "one series" in r.json()["error"]["message"]


def test_att2_explains_with_its_own_attention_and_with_grad_cam():
    from chestdx.explain import explain

    model = create_model("att2", pretrained=None).eval()
    x = torch.rand(2, 1, 64, 64)
    from chestdx.models.att2 import DIAGNOSIS

    native = explain(model, x, "native", heads=[DIAGNOSIS])
    cam = explain(model, x, "gradcam", heads=[DIAGNOSIS])
    for e in (native, cam):
        assert e.maps.shape == (2, 1, 64, 64) and float(e.maps.min()) >= 0 and float(e.maps.max()) <= 1 + 1e-6
    # the native map is sqrt(a * b) of the two modules' maps, upsampled: it peaks where both attend
    a, b = model.attention_maps(x)
    combined = model.native_maps(x)[:, 0]
    up = torch.nn.functional.interpolate(b[:, None], size=a.shape[1:], mode="bilinear", align_corners=False)[:, 0]

    def norm(m):
        f = m.flatten(1)
        return ((f - f.min(1, keepdim=True).values) / (f.max(1, keepdim=True).values - f.min(1, keepdim=True).values)).view_as(m)

    torch.testing.assert_close(combined, norm((norm(a) * norm(up)).sqrt()), atol=1e-5, rtol=1e-4)
    assert float(combined.flatten(1).max(1).values.min()) == pytest.approx(1.0)
