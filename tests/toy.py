"""Toy models and data whose right answer is known, registered like a paper's models.

Imported by the tests, and by CLI subprocesses through CHESTDX_PLUGINS=tests.toy. Images are
32 x 32 with bright squares: label `a` is a square in the top-left quadrant, `b` one in the
bottom-right, `c` is independent of the image (its AUC must stay near chance).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from chestdx.models.registry import ModelEntry, get_entry, register
from chestdx.tasks import Head

TOY_LABELS = ("a", "b", "c")


class ToyNet(nn.Module):
    """Two convolutions (`stem`), flattened (positions kept), one linear layer (`head`)."""

    def __init__(self, in_chans: int = 1, n_out: int = 3, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(width * 8 * 8, n_out)

    def forward(self, x):
        logits = self.head(self.stem(x).flatten(1))
        return {"logits": logits if logits.shape[1] > 1 else logits[:, 0]}

    def target_layer(self):
        return self.stem


class SliceStats(nn.Module):
    """A parameter-free slice "extractor" for the sequence model: a slice's mean and maximum as its
    embedding, the slice itself as its attention map."""

    embedding_dim = 2

    def embed(self, x):
        return torch.stack([x.mean(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], dim=1)

    def native_maps(self, x):
        return x

    def forward(self, x):
        return {"logits": self.embed(x)[:, 1]}


def _register():
    try:
        get_entry("toy_multilabel")
        return
    except Exception:
        pass
    register(ModelEntry(name="toy_slice_stats", builder=SliceStats, description="test toy", modality="CT",
                        heads=(Head("diagnosis", "binary", ("neg", "pos")),)))
    register(ModelEntry(name="toy_multilabel", builder=ToyNet, fixed={"n_out": 3}, description="test toy",
                        modality="CXR", heads=(Head("findings", "multilabel", TOY_LABELS),)))
    register(ModelEntry(name="toy_binary", builder=ToyNet, fixed={"n_out": 1}, description="test toy",
                        modality="CXR", heads=(Head("diagnosis", "binary", ("neg", "pos"), column="label"),)))


_register()


def write_toy_dataset(folder: Path, n: int = 160, seed: int = 0) -> Path:
    """PNG images + manifest.csv (one patient per image; 60/20/20 split); returns the manifest path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b, c = (rng.random(3) < [0.5, 0.4, 0.3]).astype(int)
        img = (rng.random((32, 32)) * 0.2).astype(np.float32)
        if a:
            y, x = rng.integers(2, 10, 2)
            img[y:y + 6, x:x + 6] = 1.0
        if b:
            y, x = rng.integers(18, 26, 2)
            img[y:y + 6, x:x + 6] = 1.0
        name = f"images/img{i:04d}.png"
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / name)
        split = "train" if i < 0.6 * n else "val" if i < 0.8 * n else "test"
        rows.append({"path": name, "label": "pos" if a else "neg", "patient_id": f"p{i}", "split": split,
                     "a": a, "b": b, "c": c if i % 10 else np.nan})  # every tenth c unknown
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def toy_overrides(manifest: Path, model: str = "toy_multilabel", epochs: int = 4) -> list[str]:
    return [f"dataset={manifest}", f"model.name={model}", "model.pretrained=null", "preprocess.size=32",
            f"train.epochs={epochs}", "train.batch_size=16", "train.lr=3e-3", "train.warmup_epochs=0",
            "train.patience=20", "augment.affine=false", "augment.hflip=0", "evaluate.tta=false",
            "evaluate.bootstrap=100"]


def lesion_sequences(n: int, rng, length: int = 16, run: int = 3, start=None):
    """(x (n, length, 8, 8), y (n,), lesion starts): half the sequences positive, with a bright square
    in `run` consecutive slices from `start` (random when None); background noise elsewhere."""
    x = rng.normal(0.3, 0.05, size=(n, length, 8, 8)).astype(np.float32)
    y = np.arange(n) % 2
    starts = np.full(n, -1)
    for b in np.flatnonzero(y):
        starts[b] = int(rng.integers(0, length - run + 1)) if start is None else int(start)
        x[b, starts[b]:starts[b] + run, 2:6, 2:6] = 1.0
    return torch.from_numpy(x), torch.from_numpy(y).float(), starts


def train_toy_sequence_model(values: str, seed: int, steps: int = 200, start=None, run: int = 3) -> dict:
    """The sequence model over `SliceStats` trained briefly (Adam 3e-3, batch 32) on `lesion_sequences`;
    on 200 new sequences: accuracy, mean attention on the lesion slices of the positives, and how often
    the attention peak falls on one of them."""
    from chestdx.models.seqattn import SequenceAttention

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SequenceAttention(extractor={"registry_name": "toy_slice_stats", "model_kwargs": {}}, hidden=16,
                              values=values)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        x, y, _ = lesion_sequences(32, rng, start=start, run=run)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x)["logits"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y, starts = lesion_sequences(200, rng, start=start, run=run)
    with torch.no_grad():
        out = model(x)
    attention = out["slice_attention"].numpy()
    positive = np.flatnonzero(y.numpy() == 1)
    on = [attention[b, starts[b]:starts[b] + run].sum() for b in positive]
    peak = [starts[b] <= attention[b].argmax() < starts[b] + run for b in positive]
    return {"accuracy": float(((out["logits"] > 0).float() == y).float().mean()),
            "attention_on_lesion": float(np.mean(on)), "peak_on_lesion_rate": float(np.mean(peak)),
            "peak_positions": np.bincount(attention[positive].argmax(1), minlength=x.shape[1]).tolist(),
            "model": model}


def weights(model: nn.Module, prefix: str) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


__all__ = ["TOY_LABELS", "SliceStats", "ToyNet", "lesion_sequences", "train_toy_sequence_model", "toy_overrides", "weights", "write_toy_dataset", "torch"]
