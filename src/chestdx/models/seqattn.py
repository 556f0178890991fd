"""RESNET50-LSTM-ATT2: a Bi-LSTM with soft attention over the slice embeddings of a frozen stage-1
model (Loconte & Colavito, Sec. III-A and V).

A sample is a sequence of S slices (B, S, H, W) (`chestdx.data.volumes.draw_sequence`: 16 evenly
spaced slices of a scan). Each slice is embedded by the stage-1 model's `embed` (ResNet50-ATT2's
concatenated g_hat, `chestdx.models.att2`), which stays frozen: no gradient, eval mode, so its
weights and batch-norm statistics leave stage 2 bit-identical. Then, with h_i the concatenated
forward and backward hidden states at slice i and h_n the last one:

    g = tanh(W_g h_n + b_g)                (Eq. 1; h_n = [forward state after slice n; backward after slice 1])
    s_i = g^T W_s h_i                      (Eq. 2)
    a_i = softmax_i(s_i)                   (Eq. 3)
    g_hat = sum_i a_i h_i                  (Eq. 4)
    v = W_c g_hat + b_c                    (Eq. 5; softmax or sigmoid, Eq. 6, by the head's task)

The forward dict carries `slice_attention` (B, S), which sums to 1 over the slices; Fig. 6's
montage weighs each slice's own attention map by it (`weighted_slice_maps`).

`values: slices` (a chestdx variant, not the paper's) pools the slices' own embeddings,
g_hat = sum_i a_i tanh(W_v e_i), with the scores still from the Bi-LSTM (Eq. 1-3). Every hidden
state of a Bi-LSTM can summarise the whole sequence, so with the paper's Eq. 4 the classifier does
not need the attention on the slices that matter, and in practice it settles on the first or last
slice, whose hidden state holds half of h_n itself (the forward state at slice n, the backward one
at slice 1), so g = g(h_n) scores it high; with the slices pooled, only the
attended slices' content reaches the classifier, so the attention has to find them
(benchmarks/reproduce_att2.py measures both).

`pretrained` is the stage-1 bundle (a `model.pt` file) at training time; the bundle of the trained
sequence model records the extractor's architecture (`extractor`) and carries its weights, so it
loads without the stage-1 file.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn

from chestdx.errors import ChestDxError
from chestdx.models.att2 import DIAGNOSIS, DIAGNOSIS_3
from chestdx.models.registry import ModelEntry, create_model, register


VALUES = ("hidden", "slices")


class SequenceAttention(nn.Module):
    def __init__(self, extractor: dict | None = None, pretrained=None, n_outputs: int = 1, hidden: int = 256,
                 dropout: float = 0.0, slice_batch: int = 64, embedding_cache: int = 0, values: str = "hidden"):
        super().__init__()
        if pretrained not in (None, "", "none"):
            from chestdx.models.bundle import load_bundle

            model, bundle = load_bundle(pretrained)
            if bundle.get("ensemble"):
                raise ChestDxError(f"{pretrained}: a seed ensemble cannot be the slice extractor; "
                                   "give one member's model.pt")
            extractor = {"registry_name": bundle["registry_name"], "model_kwargs": bundle["model_kwargs"],
                         "preprocess": bundle["preprocess"]}
        elif not extractor:
            raise ChestDxError("att2_bilstm needs its stage-1 model: set model.pretrained to the stage-1 "
                               "bundle (e.g. runs/att2_covidct/model.pt)")
        else:
            model = create_model(extractor["registry_name"], pretrained=None, **extractor["model_kwargs"])
        if not hasattr(model, "embed"):
            raise ChestDxError(f"stage-1 model {extractor['registry_name']!r} has no slice embedding (embed)")
        self.extractor_spec = extractor
        self.extractor = model
        self.extractor.requires_grad_(False)
        self.extractor.eval()
        dim = int(model.embedding_dim)
        self.slice_batch = int(slice_batch)
        # The frozen extractor is a fixed function, so a sequence seen before (training without
        # augmentation: every epoch) reuses its embeddings: up to `embedding_cache` sequences, LRU.
        self.embedding_cache = int(embedding_cache)
        self._cache: OrderedDict = OrderedDict()
        self.lstm = nn.LSTM(dim, int(hidden), batch_first=True, bidirectional=True)
        width = 2 * int(hidden)
        self.global_proj = nn.Linear(width, width)  # W_g, b_g (Eq. 1)
        self.score = nn.Linear(width, width, bias=False)  # W_s (Eq. 2)
        if values not in VALUES:
            raise ChestDxError(f"att2_bilstm: values must be one of {', '.join(VALUES)}, got {values!r}")
        self.values = values
        # values: slices pools the slice embeddings themselves (projected to the same width).
        self.value_proj = nn.Linear(dim, width) if values == "slices" else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, int(n_outputs))  # W_c, b_c (Eq. 5)
        self.n_outputs = int(n_outputs)

    export_outputs = ("slice_attention",)  # an ONNX export returns it beside the head's logits

    @property
    def bundle_kwargs(self) -> dict:
        """Constructor arguments resolved at build time, recorded in the bundle (the extractor's architecture)."""
        # The embedding cache is for training (epochs over the same sequences); a served or exported
        # model keeps no patient data between requests.
        return {"extractor": self.extractor_spec, "embedding_cache": 0}

    def check_preprocess(self, preprocess: dict) -> None:
        """The slices must reach the extractor as they reached it in stage 1."""
        used = self.extractor_spec.get("preprocess") or {}
        keys = ("size", "resize", "mean", "std", "clahe", "zscore", "lung_crop")
        differ = [f"{k}: {preprocess.get(k)!r} here, {used.get(k)!r} in stage 1" for k in keys
                  if k in used and preprocess.get(k) != used.get(k)]
        if differ:
            raise ChestDxError("preprocess must match the stage-1 model's (set these in the config): "
                               + "; ".join(differ))

    def train(self, mode: bool = True):
        super().train(mode)
        self.extractor.eval()  # frozen: batch norm keeps its statistics, dropout stays off
        return self

    def slices(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, H, W) -> the S slices as one batch of grey images (B * S, 1, H, W)."""
        if x.ndim != 4:
            raise ChestDxError(f"a sequence batch is (B, slices, H, W), got shape {tuple(x.shape)}")
        return x.reshape(x.shape[0] * x.shape[1], 1, *x.shape[2:])

    @torch.no_grad()
    def embed_slices(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, E) embeddings of the slices of a sequence batch (B, S, H, W)."""
        if not self.embedding_cache or torch.jit.is_tracing():  # an ONNX export traces the plain path
            return self._embed(x)
        keys = [hashlib.blake2b(x[b].detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()
                for b in range(x.shape[0])]
        missing = [b for b, k in enumerate(keys) if k not in self._cache]
        fresh = dict(zip(missing, self._embed(x[missing]))) if missing else {}
        out = []
        for b, k in enumerate(keys):
            if b in fresh:
                self._cache[k] = fresh[b]
            else:
                self._cache.move_to_end(k)
            out.append(self._cache[k])
        while len(self._cache) > self.embedding_cache:
            self._cache.popitem(last=False)
        return torch.stack(out)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._cache.clear()  # new extractor weights: embeddings computed before no longer hold
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.slices(x)
        out = torch.cat([self.extractor.embed(flat[i:i + self.slice_batch])
                         for i in range(0, len(flat), self.slice_batch)])
        return out.view(x.shape[0], x.shape[1], -1)

    def attend(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_hat (B, 2 hidden), the slice attention a (B, S)) of slice embeddings (B, S, E)."""
        h, (last, _) = self.lstm(embeddings)  # h_i = [forward h_i ; backward h_i]
        # h_n, "the last hidden state given by the RNN": each direction's final state, the forward one
        # after slice n and the backward one after slice 1, so both have read the whole sequence.
        h_n = torch.cat([last[0], last[1]], dim=1)
        g = torch.tanh(self.global_proj(h_n))  # Eq. 1
        scores = (self.score(h) * g[:, None, :]).sum(-1)  # s_i = g^T W_s h_i (Eq. 2)
        attention = torch.softmax(scores, dim=1)  # Eq. 3
        pooled = h if self.value_proj is None else torch.tanh(self.value_proj(embeddings))
        return (attention[:, :, None] * pooled).sum(1), attention  # Eq. 4

    def forward(self, x: torch.Tensor) -> dict:
        context, attention = self.attend(self.embed_slices(x))
        logits = self.classifier(self.dropout(context))  # Eq. 5
        return {"logits": logits.squeeze(-1) if self.n_outputs == 1 else logits, "slice_attention": attention}

    @torch.no_grad()
    def weighted_slice_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fig. 6: each slice's own attention map (the extractor's `native_maps`, (B, S, h, w) in
        [0, 1]) times the sequence attention of that slice divided by the largest one, and the
        sequence attention (B, S)."""
        attention = self.forward(x)["slice_attention"]
        maps = self.extractor.native_maps(self.slices(x))[:, 0]
        maps = maps.view(x.shape[0], x.shape[1], *maps.shape[1:])
        weight = attention / attention.max(1, keepdim=True).values
        return maps * weight[:, :, None, None], attention


_PREPROCESS = {"channels": 1, "resize": "pad", "clahe": False, "sequence_length": 16, "hu_window": [-600, 1500]}
_PAPER = "resnet50-att2-bilstm_ct_004"

register(ModelEntry(
    name="att2_bilstm", builder=SequenceAttention, fixed={"n_outputs": 1}, heads=(DIAGNOSIS,), sample="sequence",
    description="RESNET50-LSTM-ATT2: Bi-LSTM + soft attention over 16 slices embedded by a frozen ATT2 "
                "(Loconte et al.), COVID vs not",
    modality="CT", preprocessing=_PREPROCESS, paper=_PAPER,
))
register(ModelEntry(
    name="att2_bilstm_3class", builder=SequenceAttention, fixed={"n_outputs": 3}, heads=(DIAGNOSIS_3,),
    sample="sequence",
    description="RESNET50-LSTM-ATT2 on the paper's three classes (normal, pneumonia, COVID-19)",
    modality="CT", preprocessing=_PREPROCESS, paper=_PAPER,
))
