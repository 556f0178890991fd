"""Dual-sampling attention network (Ouyang et al., IEEE TMI 2020): COVID-19 vs community-acquired
pneumonia (CAP) from 3D CT volumes masked to the lungs.

- Network (Sec. III-A): MONAI's 3D ResNet34, one input channel, first convolution at stride 2 (as
  the 3D ResNet of Hara et al. the paper cites) and the last residual stage at stride 1, so the
  feature maps before global average pooling are 1/16 of the input per axis.
- Online attention (Sec. III-B): the FC weights used as a 1x1x1 convolution on those features,
  A = ReLU(conv(f, w)) (Eq. 1), upsampled to the input, normalised to [0, 1] per volume, then
  T(A) = 1 / (1 + exp(-alpha (A - beta))), alpha = 100, beta = 0.4 (Eq. 2). The kernel is the FC
  weight itself, detached: it is "always copied from the FC layer and only updated by the BCE loss".
- Loss (Sec. III-D): L = L_c + lambda L_ex (Eq. 4), lambda = 0.5, L_c the BCE, and for COVID cases
  only L_ex = sum (T(A) - M)^2 / (sum T(A) + sum M) (Eq. 3), M the infection mask (`DSANMethod`).
  "RN34 + US" is the same network trained with lambda = 0 (its T(A) is then a plain CAM).
- Size-balanced sampling (Sec. III-C): four groups by infection-to-lung volume ratio, weights
  [N_large^covid / N_small^covid, 1, 1, N_small^cap / N_large^cap], a group drawn per sample with
  probability proportional to its weight, then a case uniformly in it (`SizeBalancedSampler`).
- Dual sampling (Sec. III-E): P = w P_US + (1 - w) P_SS with w = 0.35 where the ratio is < 0.001 or
  > 0.030, else 0.96 (Eq. 5) (`DualSamplingEnsemble`). The paper takes the ratio from its VB-Net
  infection and lung segmentations; given no ratio, the ensemble estimates it from the US model's
  own attention T(A) > 0.5 inside the lungs (the input is zero outside them), which L_ex trains to
  match the infection masks. Which one was used is returned (`ratio_from_attention`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chestdx.errors import ChestDxError
from chestdx.models.ensemble import Ensemble, register_ensemble_rule
from chestdx.models.registry import ModelEntry, register
from chestdx.tasks import Head
from chestdx.train.methods import SupervisedMethod, register_method

DIAGNOSIS = Head("diagnosis", "binary", ("cap", "covid"), output="logits")
ALPHA, BETA = 100.0, 0.4  # Eq. 2
LAMBDA_EX = 0.5  # Eq. 4
# Size groups of the sampler (Sec. III-C): COVID small below 0.030, CAP large above 0.001.
COVID_SMALL_BELOW = 0.030
CAP_LARGE_ABOVE = 0.001
GROUPS = ("covid_small", "covid_large", "cap_small", "cap_large")
# Eq. 5: the US model's weight outside [0.001, 0.030] and inside it.
ENSEMBLE_LOW, ENSEMBLE_HIGH = 0.001, 0.030
W_OUTSIDE, W_INSIDE = 0.35, 0.96
# Table III's groups for reporting.
TABLE3_GROUPS = (("<0.005", 0.0, 0.005), ("0.005-0.030", 0.005, 0.030), (">0.030", 0.030, float("inf")))


class DSAN(nn.Module):
    """3D ResNet34 with the online attention module; forward returns the COVID logit and T(A)."""

    export_outputs = ("attention",)  # ONNX outputs beside the head's logits

    def __init__(self, in_chans: int = 1, widen_factor: float = 1.0, alpha: float = ALPHA, beta: float = BETA):
        super().__init__()
        from monai.networks.nets import resnet34

        net = resnet34(spatial_dims=3, n_input_channels=in_chans, num_classes=1, conv1_t_stride=2,
                       widen_factor=widen_factor)
        last = net.layer4[0]  # the last stage at stride 1: features 1/16 of the input, not 1/32
        last.conv1.stride = (1, 1, 1)
        if last.downsample is not None:
            last.downsample[0].stride = (1, 1, 1)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.fc = nn.Linear(net.fc.in_features, 1)
        self.alpha, self.beta = float(alpha), float(beta)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def attention_kernel(self) -> torch.Tensor:
        """The 1x1x1 convolution kernel of Eq. 1: the FC weights, detached, so L_ex moves the
        features but never the classifier."""
        return self.fc.weight.detach()[:, :, None, None, None]

    def forward(self, x: torch.Tensor) -> dict:
        f = self.features(x)
        logits = self.fc(f.mean(dim=(2, 3, 4))).squeeze(-1)
        a = F.relu(F.conv3d(f, self.attention_kernel()))  # Eq. 1
        norm = normalised_attention(a, x.shape[2:])
        # attention_map: A before the sigmoid, whose ranking T(A)'s saturated top no longer shows
        # (the pointing game needs one maximum, not a plateau of ones)
        return {"logits": logits, "attention": torch.sigmoid(self.alpha * (norm - self.beta)), "attention_map": norm}

    def target_layer(self) -> nn.Module:
        """The last residual stage, for 3D Grad-CAM."""
        return self.layer4


def soft_mask(a: torch.Tensor, size, alpha: float = ALPHA, beta: float = BETA) -> torch.Tensor:
    """Eq. 2: A upsampled to the input size, min-max normalised per volume, then
    sigmoid(alpha (A - beta))."""
    return torch.sigmoid(alpha * (normalised_attention(a, size) - beta))


def normalised_attention(a: torch.Tensor, size) -> torch.Tensor:
    """A upsampled (trilinear) to the input size and min-max normalised per volume (Eq. 2's inside)."""
    up = F.interpolate(a, size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)
    flat = up.flatten(1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    shape = (-1,) + (1,) * (up.dim() - 1)
    return (up - lo.view(shape)) / (hi - lo).clamp_min(1e-6).view(shape)


def attention_loss(attention: torch.Tensor, mask: torch.Tensor, covid: torch.Tensor) -> torch.Tensor:
    """Eq. 3, averaged over the COVID cases of the batch; 0 (with a graph) when there are none."""
    t = attention.flatten(1)
    m = mask.to(t.dtype).flatten(1)
    per_case = ((t - m) ** 2).sum(1) / (t.sum(1) + m.sum(1)).clamp_min(1e-6)
    keep = covid.to(t.dtype)
    return (per_case * keep).sum() / keep.sum().clamp_min(1.0)


# ------------------------------------------------------------------ size-balanced sampling


def size_groups(ratios, covid) -> np.ndarray:
    """Each case's group index into GROUPS (Sec. III-C)."""
    r, c = np.asarray(ratios, dtype=float), np.asarray(covid).astype(bool)
    return np.where(c, np.where(r < COVID_SMALL_BELOW, 0, 1), np.where(r > CAP_LARGE_ABOVE, 3, 2))


def group_weights(groups) -> np.ndarray:
    """[N_large^covid / N_small^covid, 1, 1, N_small^cap / N_large^cap]; an empty group weighs 0."""
    n = np.bincount(np.asarray(groups), minlength=4).astype(float)
    w = np.array([n[1] / n[0] if n[0] else 0.0, 1.0, 1.0, n[2] / n[3] if n[3] else 0.0])
    w[n == 0] = 0.0
    if not w.sum():
        raise ChestDxError("size-balanced sampling: no case in any size group")
    return w


class SizeBalancedSampler(torch.utils.data.Sampler):
    """`num_samples` draws per epoch: a group with probability weight / sum of weights, then a case
    uniformly within it (with replacement, as the paper over-samples the minority groups)."""

    def __init__(self, ratios, covid, num_samples: int | None = None, generator: torch.Generator | None = None):
        self.groups = size_groups(ratios, covid)
        self.weights = group_weights(self.groups)
        self.members = [np.flatnonzero(self.groups == g) for g in range(4)]
        self.num_samples = int(num_samples if num_samples is not None else len(self.groups))
        self.generator = generator

    @property
    def probabilities(self) -> np.ndarray:
        return self.weights / self.weights.sum()

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        p = torch.as_tensor(self.probabilities, dtype=torch.float64)
        picks = torch.multinomial(p, self.num_samples, replacement=True, generator=self.generator)
        u = torch.rand(self.num_samples, generator=self.generator, dtype=torch.float64).numpy()
        for g, r in zip(picks.tolist(), u):
            members = self.members[g]
            yield int(members[min(int(r * len(members)), len(members) - 1)])


# ------------------------------------------------------------------ the dual-sampling ensemble


def ensemble_weight(ratio: torch.Tensor) -> torch.Tensor:
    """Eq. 5's w per case: 0.35 where the ratio is < 0.001 or > 0.030, 0.96 otherwise."""
    ratio = torch.as_tensor(ratio, dtype=torch.float32)
    outside = (ratio < ENSEMBLE_LOW) | (ratio > ENSEMBLE_HIGH)
    return torch.where(outside, torch.full_like(ratio, W_OUTSIDE), torch.full_like(ratio, W_INSIDE))


def attention_ratio(attention: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Infection-to-lung ratio estimated from T(A) > 0.5 inside the lungs (input > 0: the input is
    masked to the lungs, zero outside)."""
    lungs = (x > 0).flatten(1).to(attention.dtype)
    inside = (attention > 0.5).flatten(1).to(attention.dtype) * lungs
    return inside.sum(1) / lungs.sum(1).clamp_min(1.0)


class DualSamplingEnsemble(Ensemble):
    """Eq. 5 over two trained DSAN models: members[0] trained with uniform sampling (US),
    members[1] with size-balanced sampling (SS)."""

    rule = "dual_sampling"
    export_outputs = ("attention", "infection_ratio", "ensemble_weight", "ratio_from_attention")

    def __init__(self, members: list[nn.Module], heads):
        if len(members) != 2:
            raise ValueError("the dual-sampling ensemble takes two models: uniform (US), size-balanced (SS)")
        super().__init__(members, heads)

    def forward(self, x: torch.Tensor, ratio: torch.Tensor | None = None) -> dict:
        us, ss = self.members[0](x), self.members[1](x)
        estimated = ratio is None
        if estimated:
            ratio = attention_ratio(us["attention"], x)
        ratio = torch.as_tensor(ratio, dtype=x.dtype, device=x.device).reshape(-1)
        w = ensemble_weight(ratio).to(x.dtype)
        head = self.heads[0]
        p = w * torch.sigmoid(us["logits"]) + (1 - w) * torch.sigmoid(ss["logits"])
        wv = w.view(-1, *([1] * (us["attention"].dim() - 1)))
        return {"logits": torch.logit(p.clamp(1e-6, 1 - 1e-6)) if head.task == "binary" else head.kind.logits_of(p),
                "attention": wv * us["attention"] + (1 - wv) * ss["attention"],
                "attention_map": wv * us["attention_map"] + (1 - wv) * ss["attention_map"],
                "infection_ratio": ratio, "ensemble_weight": w,
                "ratio_from_attention": torch.full_like(ratio, float(estimated))}



register_ensemble_rule(DualSamplingEnsemble.rule, DualSamplingEnsemble)


# ------------------------------------------------------------------ the training method


@register_method
class DSANMethod(SupervisedMethod):
    """L = L_c + lambda L_ex (Eq. 3-4); `sampling` picks uniform (US) or size-balanced (SS) batches;
    `dual` trains the two as the members of a `train.ensemble: 2` run and combines them by Eq. 5."""

    name = "dsan"
    options = {"lambda_ex": LAMBDA_EX, "sampling": "uniform"}
    SAMPLINGS = ("uniform", "size_balanced", "dual")

    def __init__(self, heads, train_cfg, options=None, seed: int = 0):
        super().__init__(heads, train_cfg, options, seed)
        if self.opts["sampling"] not in self.SAMPLINGS:
            raise ChestDxError(f"method.sampling must be one of {', '.join(self.SAMPLINGS)}, "
                               f"not {self.opts['sampling']!r}")
        self.ratios = None

    # A `dual` run: member 0 uniform, member 1 size-balanced, combined by Eq. 5.
    @classmethod
    def member_config(cls, cfg: dict, k: int) -> dict:
        method = cfg.setdefault("method", {})
        if method.get("sampling") == "dual":
            if int(cfg["train"].get("ensemble") or 1) != 2:
                raise ChestDxError("method.sampling: dual trains two models; set train.ensemble: 2")
            method["sampling"] = ("uniform", "size_balanced")[k]
        return cfg

    @classmethod
    def ensemble_rule(cls, cfg: dict) -> str:
        return DualSamplingEnsemble.rule if (cfg.get("method") or {}).get("sampling") == "dual" else "mean"

    def fit_to(self, dataset) -> None:
        super().fit_to(dataset)
        if self.opts["sampling"] == "size_balanced":
            self.ratios = dataset_infection_ratios(dataset)

    def losses(self, model, batch, rng):
        out = model(batch["image"])
        losses = self.head_losses(out, batch)
        if float(self.opts["lambda_ex"]):
            if "mask" not in batch:
                raise ChestDxError("method.lambda_ex > 0 needs infection masks: a `mask` column in the manifest "
                                   "(set method.lambda_ex: 0 to train without them)")
            name = self.heads[0].name
            covid = (batch["targets"][name] == 1) & batch["known"][name].bool()
            if "mask_known" in batch:  # COVID cases without an infection mask give no L_ex
                covid = covid & batch["mask_known"].bool()
            losses["attention"] = attention_loss(out["attention"], batch["mask"], covid)
        return self.total(losses)

    def total(self, losses: dict) -> dict:
        out = super().total({k: v for k, v in losses.items() if k != "attention"})
        if "attention" in losses:
            out["loss"] = out["loss"] + float(self.opts["lambda_ex"]) * losses["attention"]
            out["loss_attention"] = losses["attention"]
        return out

    def parameter_groups(self, model, train_cfg):
        # Trained from scratch (Sec. IV-C): one learning rate for every parameter.
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": float(train_cfg["lr"])}]

    def sampler(self, dataset, train_cfg, generator):
        if self.opts["sampling"] != "size_balanced":
            return None
        covid, _ = dataset.head_arrays(self.heads[0].name)
        return SizeBalancedSampler(self.ratios, np.asarray(covid) == 1, len(dataset), generator)


def dataset_infection_ratios(dataset) -> np.ndarray:
    """Each training case's infection-to-lung ratio: the manifest's `infection_ratio` column where it
    has one (measured on the native grid), else from the preprocessed arrays (lungs: input > 0, the
    input being masked to them; infection: the mask)."""
    frame = dataset.manifest.frame
    if "infection_ratio" in frame.columns and frame["infection_ratio"].notna().all():
        return frame["infection_ratio"].to_numpy(dtype=float)
    if dataset.masks is None:
        raise ChestDxError("size-balanced sampling needs each case's infection ratio: an `infection_ratio` "
                           "column or a `mask` column (infection masks) in the manifest")
    ratios = []
    for i in range(len(dataset)):
        lungs = dataset.images[i] > 0
        ratios.append(float((dataset.masks[i] > 0.5)[lungs].sum() / max(1, lungs.sum())))
    return np.asarray(ratios)


# Sec. IV-B: lungs only, window 1500 / level -600 (clip to [-1350, 150] HU), scaled to [0, 1] with no
# further normalisation (zero stays "outside the lungs"), 0.7168 x 0.7168 x 1.25 mm, 138 x 256 x 256.
PREPROCESS = {"channels": 1, "hu_window": [-600, 1500], "lung_mask": True, "spacing": [1.25, 0.7168, 0.7168],
              "size": [138, 256, 256], "resize": "pad", "mean": 0.0, "std": 1.0, "clahe": False}

register(ModelEntry(
    name="dsan", builder=DSAN, method="dsan", heads=(DIAGNOSIS,), sample="volume", spatial_dims=3,
    description="Dual-sampling attention network: 3D ResNet34 + online CAM attention (Ouyang et al., TMI 2020)",
    modality="CT", preprocessing=PREPROCESS, paper="dual-sampling-attention_ct3d_001",
))
