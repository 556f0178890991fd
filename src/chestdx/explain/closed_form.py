"""CAM, Grad-CAM and Grad-CAM++ in closed form, from the target layer's feature maps alone.

When every explained score column is, after the target layer, a per-position ("pointwise") map
of its feature maps A (K x h x w), global average pooling and a linear layer,

    y_c = sum_m w_cm mean_ij F_m(i, j) + b_c,   F(i, j) = f(A(:, i, j))   (f: 1x1 convs, eval-mode
                                                                           batch norms, activations)

the gradient of y_c with respect to A_k(i, j) is

    dy_c / dA_k(i, j) = (1 / hw) [J_f(i, j)^T w_c]_k,

known from A and the head's weights without a backward pass. With f the identity (ResNet,
DenseNet: the pooled layer is the target layer) it is w_ck / hw, constant over positions; with
EfficientNet's `conv_head` + `bn2` (BN + ReLU6) after the last stage, the layer `explain` weighs,
J_f(i, j) = diag(relu6'(z(i, j))) W, one small matrix product per position. Either way the result
is the gradient autograd computes, not an approximation of it.

From the gradients G = dy_c/dA the CAM family weighs the channels as pytorch-grad-cam does:

- CAM (Zhou et al., 2016, chestdx's `CAM`): alpha_k = sum_ij G_k(i, j) (= w_ck for GAP + linear);
- Grad-CAM (Selvaraju et al., 2017, Eq. 1): alpha_k = (1 / Z) sum_ij G_k(i, j);
- Grad-CAM++ (Chattopadhyay et al., 2018, Eq. 19): with the exponential score Y_c = exp(y_c) the
  second and third derivatives are powers of the first, so
  a_k(i, j) = G^2 / (2 G^2 + sum_ab A_k(a, b) G^3 + 1e-6) (0 where G = 0) and
  alpha_k = sum_ij a_k(i, j) relu(G_k(i, j));

then M = relu(sum_k alpha_k A_k) (Grad-CAM Eq. 2), min-max scaled and resized (OpenCV bilinear)
to the input per target layer, averaged over the layers (an ensemble's members), made
non-negative and min-max scaled again (pytorch-grad-cam's BaseCAM).

Scores follow `explain`'s convention (`ScoreModel`): a binary head's logit l gives the columns
(-l/2, l/2), and "predicted" is the primary head's most probable label. A seed ensemble averages
its members' probabilities (`Task.combine`), so a column's gradient with respect to member m's
logits is an image-dependent vector d_m (for a binary head, a scalar times the logit's weight);
it is computed here by autograd through the task's own `combine` and `score_columns` on the
(B, K) logits only, then each member's map uses d_m W_m as its w_c.

The structure is read from the model's own code with torch.fx (every module that does not
contain the target layer is one opaque call), so nothing is inferred from a model's name or its
tensor shapes; a model whose head is anything else gets None (the service keeps the PyTorch path).
"""

from __future__ import annotations

import hashlib
import logging
import operator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chestdx.errors import ChestDxError
from chestdx.explain.core import (Explanation, column_names, method_name, model_heads, resolve_targets,
                                  score_matrix, score_probabilities)
from chestdx.tasks import heads_from

log = logging.getLogger("chestdx.explain")

CLOSED_FORM_METHODS = ("cam", "gradcam", "gradcam++")
FORM = "pointwise-gap-linear-v1"
FEATURE_OUTPUT = "cam_features"
_GRADCAMPP_EPS = 0.000001  # pytorch_grad_cam.GradCAMPlusPlus
_SCALE_EPS = 1e-7  # pytorch_grad_cam.utils.image.scale_cam_image


class NotClosedForm(Exception):
    """The model's scores are not a pointwise map + GAP + linear function of the target layer."""


# ----------------------------------------------------------------------------------------------
# The structural check


def target_layers(model: nn.Module) -> list[nn.Module]:
    """The layers `explain` weighs, in its order (an ensemble: one per member)."""
    if hasattr(model, "target_layers"):
        return list(model.target_layers())
    if hasattr(model, "target_layer"):
        return [model.target_layer()]
    return []


def closed_form_spec(model: nn.Module, heads=None) -> dict | None:
    """What the closed form needs for `model`'s score columns, or None when its heads are not of
    that form. `heads`: the explained heads in score-column order (as given to `explain`)."""
    return closed_form_check(model, heads)[0]


def closed_form_check(model: nn.Module, heads=None) -> tuple[dict | None, str]:
    """(spec, "") or (None, why not). An analysis that fails unexpectedly also answers None (and logs):
    the PyTorch path is always there to fall back on."""
    try:
        return _spec(model, heads), ""
    except NotClosedForm as err:
        return None, str(err)
    except Exception as err:
        log.warning("closed-form CAM analysis of %s failed: %s: %s", type(model).__name__, type(err).__name__, err)
        return None, f"analysis failed ({type(err).__name__}: {err})"


def _spec(model: nn.Module, heads) -> dict:
    from chestdx.models.ensemble import Ensemble

    model.eval()  # as `explain` does
    try:
        heads = model_heads(model, heads)
    except ChestDxError as err:
        raise NotClosedForm(str(err)) from None
    for attr in ("cam_layer", "cam_to_input", "export_parts"):
        if hasattr(model, attr):
            raise NotClosedForm(f"{type(model).__name__} has {attr}(): per-head layers or maps moved after the CAM")
    layers = target_layers(model)
    if not layers:
        raise NotClosedForm(f"{type(model).__name__} declares no target layer")
    outputs = list(dict.fromkeys(h.output for h in heads))
    ensemble = type(model) is Ensemble  # not a subclass: its forward is the one read here
    if ensemble:
        # Ensemble.forward: each head's output is its task's `combine` of the members' outputs.
        members = list(model.members)
        if len(layers) != len(members):
            raise NotClosedForm("an ensemble whose members do not have one target layer each")
        if {h.output for h in heads} - {h.output for h in model.heads}:
            raise NotClosedForm("heads the ensemble does not combine")
        for member, layer in zip(members, layers):
            for attr in ("cam_layer", "cam_to_input", "export_parts", "target_layers"):
                if hasattr(member, attr):
                    raise NotClosedForm(f"ensemble member {type(member).__name__} has {attr}()")
            if not hasattr(member, "target_layer") or member.target_layer() is not layer:
                raise NotClosedForm("the ensemble's target layers are not its members' own")
    elif len(layers) != 1:
        raise NotClosedForm(f"{type(model).__name__} has {len(layers)} target layers")
    else:
        members = [model]
    names = [FEATURE_OUTPUT] if len(members) == 1 else [f"{FEATURE_OUTPUT}_{m}" for m in range(len(members))]
    specs = []
    for member, layer, name in zip(members, layers, names):
        pointwise, coefs = _analyse(member, layer, outputs)
        for h in heads:
            _check_head_shape(h, coefs[h.output][0])
        specs.append({"feature": name, "pointwise": pointwise,
                      "outputs": {o: {"weight": w, "bias": b} for o, (w, b) in coefs.items()}})
    return {"form": FORM, "heads": [h.to_dict() for h in heads], "ensemble": ensemble, "members": specs}


def _check_head_shape(head, weight: np.ndarray) -> None:
    """A binary head is one logit per image, a multi-class or multi-label head one per label."""
    shape = weight.shape[:-1]
    want = () if head.task == "binary" else (len(head.labels),)
    if shape != want:
        raise NotClosedForm(f"head {head.name!r}: output of shape {shape}, expected {want}")


class _Tracer(torch.fx.Tracer):
    """Traces through the modules that contain the target layer only; every other module is one
    call (whatever its code), so a backbone's stem need not be traceable."""

    def __init__(self, root: nn.Module, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.containers = {id(m) for m in root.modules() if m is not layer and any(s is layer for s in m.modules())}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) not in self.containers


@dataclass
class _Spatial:
    """A per-position function of A: (B, C, h, w), or (B, C, hw) when `flat`."""

    ops: list
    channels: int | None
    flat: bool = False


@dataclass
class _Lin:
    """An affine function of the pooled features P (B, C): value = coef . P + bias, of shape (B, *shape).
    coef None: P itself (shape: C, then trailing singleton dims; C None until a linear layer tells it).
    `ops`: the pointwise chain between A and the pooling."""

    coef: np.ndarray | None
    bias: np.ndarray | None
    shape: tuple
    ops: list
    channels: int | None = None


def _pooled(value: _Spatial, trailing: tuple) -> _Lin:
    return _Lin(None, None, (value.channels, *trailing), value.ops, value.channels)


_FREE = object()  # a value that does not depend on the target layer's output


def _analyse(model: nn.Module, layer: nn.Module, outputs: list) -> tuple[list, dict]:
    """(the pointwise chain, {output: (coef (*shape, C'), bias (*shape))}) of a model whose outputs are
    affine in the global average of a pointwise map of `layer`'s output."""
    tracer = _Tracer(model, layer)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # any code torch.fx cannot follow: keep the PyTorch path
        raise NotClosedForm(f"{type(model).__name__} is not traceable by torch.fx ({type(err).__name__}: {err})") \
            from None
    values: dict = {}
    seen_layer = False
    result = None
    for node in graph.nodes:
        if node.op == "output":
            result = node.args[0]
            continue
        if node.op == "call_module" and model.get_submodule(node.target) is layer:
            if seen_layer:
                raise NotClosedForm("the target layer runs more than once")
            seen_layer = True
            values[node] = _Spatial([], None)
            continue
        if all(values[a] is _FREE for a in node.all_input_nodes):
            values[node] = _FREE
            continue
        values[node] = _step(model, node, values)
    if not seen_layer:
        raise NotClosedForm("the target layer is not called in forward()")
    if not isinstance(result, dict):
        raise NotClosedForm("forward() does not return a dict")
    coefs, chains = {}, []
    for name in outputs:
        node = result.get(name)
        value = values.get(node) if isinstance(node, torch.fx.Node) else None
        if not isinstance(value, _Lin) or value.coef is None:
            raise NotClosedForm(f"output {name!r} is not a linear function of the pooled target-layer features")
        coefs[name] = (value.coef.astype(np.float32), value.bias.astype(np.float32))
        chains.append(value.ops)
    if any(c is not chains[0] for c in chains):
        raise NotClosedForm("the outputs pool different branches of the target layer")
    chain = []
    for op in chains[0]:  # consecutive affine maps folded into one (a 1-D weight: a diagonal one, batch norm)
        if op[0] == "affine" and chain and chain[-1][0] == "affine":
            _, w0, b0 = chain.pop()
            w1, b1 = op[1], op[2]
            w = w1 * w0 if w0.ndim == w1.ndim == 1 else (w1[:, None] * w0 if w1.ndim == 1 else
                                                          (w1 * w0[None, :] if w0.ndim == 1 else w1 @ w0))
            op = ("affine", w, (w1 * b0 if w1.ndim == 1 else w1 @ b0) + b1)
        chain.append(op)
    pointwise = [{"op": "affine", "weight": (np.diag(op[1]) if op[1].ndim == 1 else op[1]).astype(np.float32),
                  "bias": op[2].astype(np.float32)} if op[0] == "affine" else {"op": "act", "name": op[1]}
                 for op in chain]
    return pointwise, coefs


def _module_step(module: nn.Module, value, node) -> object:
    t = type(module)
    if t in (nn.Identity,) or (t in (nn.Dropout, nn.Dropout2d) and not module.training):
        return value
    if isinstance(value, _Spatial):
        if value.flat:
            raise NotClosedForm(f"{t.__name__} on flattened feature maps")
        conv = _conv_types()
        if t in conv:
            k, s = tuple(module.kernel_size), tuple(module.stride)
            pad = module.padding if isinstance(module.padding, str) else tuple(module.padding)
            if set(k) != {1} or set(s) != {1} or module.groups != 1 or pad not in ((0, 0), "valid", "same"):
                raise NotClosedForm(f"{node.target}: not a 1x1, stride-1 convolution")
            w = module.weight.detach().double().numpy()[:, :, 0, 0]
            b = np.zeros(len(w)) if module.bias is None else module.bias.detach().double().numpy()
            return _Spatial(value.ops + [("affine", w, b)], len(w))
        norm_act = _norm_act_type()
        if t is nn.BatchNorm2d or (norm_act is not None and t is norm_act):
            ops = value.ops + [_batch_norm(module, node)]
            if t is nn.BatchNorm2d:
                return _Spatial(ops, module.num_features)
            if not (type(module.drop) is nn.Identity or (type(module.drop) in (nn.Dropout, nn.Dropout2d)
                                                          and not module.drop.training)):
                raise NotClosedForm(f"{node.target}: dropout in training mode")
            act = _activation(module.act, node, raw=False)
            return _Spatial(ops + ([act] if act else []), module.num_features)
        if t in _ACTIVATIONS:
            act = _activation(module, node, raw=not value.ops)
            return _Spatial(value.ops + [act], value.channels)
        if t is nn.AdaptiveAvgPool2d and _is_one(module.output_size):
            return _pooled(value, (1, 1))
        pool = _select_pool_type()
        if pool is not None and t is pool:
            if module.pool_type != "avg" or type(module.pool) is not nn.AdaptiveAvgPool2d or \
                    not _is_one(module.pool.output_size):
                raise NotClosedForm(f"{node.target}: {module.pool_type} pooling, not global average pooling")
            if type(module.flatten) is nn.Flatten and module.flatten.start_dim == 1 and module.flatten.end_dim == -1:
                return _pooled(value, ())
            if type(module.flatten) is nn.Identity:
                return _pooled(value, (1, 1))
            raise NotClosedForm(f"{node.target}: unexpected flatten")
        raise NotClosedForm(f"{node.target} ({t.__name__}) on the feature maps is not a pointwise map or GAP")
    if isinstance(value, _Lin):
        if t is nn.Linear:
            return _linear(value, module.weight.detach().double().numpy(),
                           None if module.bias is None else module.bias.detach().double().numpy())
        if t is nn.Flatten and module.start_dim == 1 and module.end_dim == -1:
            return _flatten(value)
        raise NotClosedForm(f"{node.target} ({t.__name__}) on the pooled features is not linear")
    raise NotClosedForm(f"{node.target}: unsupported input")


def _step(model: nn.Module, node, values: dict):
    inputs = node.all_input_nodes
    if len(inputs) != 1:
        raise NotClosedForm(f"{node.name}: combines the target layer's output with other tensors")
    source = inputs[0]
    value = values[source]
    args = [value if a is source else a for a in node.args]
    kwargs = {k: value if v is source else v for k, v in node.kwargs.items()}
    if not any(a is value for a in list(args) + list(kwargs.values())):
        raise NotClosedForm(f"{node.name}: uses the target layer's output inside a container")
    if node.op == "call_module":
        if args[0] is not value or len(args) != 1 or kwargs:
            raise NotClosedForm(f"{node.target}: unexpected arguments")
        return _module_step(model.get_submodule(node.target), value, node)
    if node.op not in ("call_function", "call_method"):
        raise NotClosedForm(f"{node.name}: {node.op} on the target layer's output")
    fn = node.target
    if args[0] is not value:
        if fn in (operator.mul, operator.add) and len(args) == 2 and args[1] is value:
            args = [args[1], args[0]]  # commutative: 2 * x
        else:
            raise NotClosedForm(f"{node.name}: the target layer's output is not the first argument")
    rest = args[1:]
    if isinstance(value, _Spatial):
        if fn in (F.relu, torch.relu, "relu", F.relu6, F.silu):
            if kwargs.get("inplace") or (len(rest) and rest[0] is True):
                if not value.ops:
                    raise NotClosedForm(f"{node.name}: in-place activation on the target layer's output")
            name = {F.relu6: "relu6", F.silu: "silu"}.get(fn, "relu")
            return _Spatial(value.ops + [("act", name)], value.channels, value.flat)
        if fn in (F.dropout, F.dropout2d) and not (rest[1] if len(rest) > 1 else kwargs.get("training", True)):
            return value
        if fn == "flatten" or fn is torch.flatten:
            start = rest[0] if rest else kwargs.get("start_dim", 0)
            end = rest[1] if len(rest) > 1 else kwargs.get("end_dim", -1)
            if start == 2 and end in (-1, 3) and not value.flat:
                return _Spatial(value.ops, value.channels, flat=True)
            raise NotClosedForm(f"{node.name}: flatten({start}, {end}) of the feature maps")
        if fn in ("mean", torch.mean):
            dims = rest[0] if rest else kwargs.get("dim")
            keep = rest[1] if len(rest) > 1 else kwargs.get("keepdim", False)
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            spatial = {2} if value.flat else {2, 3}
            ndim = 3 if value.flat else 4
            if dims and {d % ndim for d in dims} == spatial and "dtype" not in kwargs:
                return _pooled(value, (1,) * len(spatial) if keep else ())
            raise NotClosedForm(f"{node.name}: mean over {dims} is not a global average")
        if fn is F.adaptive_avg_pool2d and _is_one(rest[0] if rest else kwargs.get("output_size")):
            return _pooled(value, (1, 1))
        raise NotClosedForm(f"{node.name}: {getattr(fn, '__name__', fn)} on the feature maps")
    # An affine function of the pooled features.
    if fn in (F.dropout,) and not (rest[1] if len(rest) > 1 else kwargs.get("training", True)):
        return value
    if fn is operator.neg:
        return _scaled(value, -1.0, 0.0)
    if fn in (operator.mul, operator.truediv, operator.add, operator.sub) and len(rest) == 1 \
            and isinstance(rest[0], (int, float)) and not isinstance(rest[0], bool) \
            and not (fn is operator.truediv and rest[0] == 0):
        c = float(rest[0])
        return {operator.mul: lambda: _scaled(value, c, 0.0), operator.truediv: lambda: _scaled(value, 1 / c, 0.0),
                operator.add: lambda: _scaled(value, 1.0, c), operator.sub: lambda: _scaled(value, 1.0, -c)}[fn]()
    if fn in ("squeeze", torch.squeeze) and (len(rest) == 1 or "dim" in kwargs):
        dim = rest[0] if rest else kwargs["dim"]
        if isinstance(dim, int):
            return _squeeze(value, dim)
    if fn in ("flatten", torch.flatten):
        start = rest[0] if rest else kwargs.get("start_dim", 0)
        end = rest[1] if len(rest) > 1 else kwargs.get("end_dim", -1)
        if start == 1 and end == -1:
            return _flatten(value)
    raise NotClosedForm(f"{node.name}: {getattr(fn, '__name__', fn)} on the pooled features is not linear")


def _materialise(value: _Lin, channels: int | None = None) -> _Lin:
    """The pooled features as an explicit affine map (C from the first linear layer if not known)."""
    if value.coef is not None:
        return value
    c = value.channels if value.channels is not None else channels
    if c is None:
        raise NotClosedForm("the pooled features' channel count is unknown")
    if value.channels is not None and channels is not None and value.channels != channels:
        raise NotClosedForm(f"a linear layer of {channels} inputs on {value.channels} channels")
    trailing = value.shape[1:]
    coef = np.eye(c).reshape(c, *trailing, c)
    return _Lin(coef, np.zeros((c, *trailing)), (c, *trailing), value.ops, c)


def _linear(value: _Lin, w: np.ndarray, b) -> _Lin:
    value = _materialise(value, w.shape[1])
    if value.shape[-1] != w.shape[1]:
        raise NotClosedForm(f"a linear layer of {w.shape[1]} inputs on a dimension of {value.shape[-1]}")
    coef = np.einsum("oi,...iC->...oC", w, value.coef)
    bias = value.bias @ w.T + (0.0 if b is None else b)
    return _Lin(coef, bias, (*value.shape[:-1], w.shape[0]), value.ops, value.channels)


def _flatten(value: _Lin) -> _Lin:
    if value.coef is None:
        if all(s == 1 for s in value.shape[1:]):
            return _Lin(None, None, value.shape[:1], value.ops, value.channels)
        raise NotClosedForm("flatten of pooled features of unknown shape")
    n = int(np.prod(value.shape))
    return _Lin(value.coef.reshape(n, value.coef.shape[-1]), value.bias.reshape(n), (n,), value.ops, value.channels)


def _squeeze(value: _Lin, dim: int) -> _Lin:
    value = _materialise(value)
    d = dim % (len(value.shape) + 1)
    if d == 0:
        raise NotClosedForm("squeeze of the batch dimension")
    if value.shape[d - 1] != 1:
        return value  # torch's squeeze leaves a dimension of size > 1 alone
    shape = value.shape[:d - 1] + value.shape[d:]
    return _Lin(value.coef.reshape(*shape, value.coef.shape[-1]), value.bias.reshape(shape), shape, value.ops,
                value.channels)


def _scaled(value: _Lin, scale: float, shift: float) -> _Lin:
    value = _materialise(value)
    return _Lin(value.coef * scale, value.bias * scale + shift, value.shape, value.ops, value.channels)


def _batch_norm(module: nn.BatchNorm2d, node) -> tuple:
    if module.training or module.running_mean is None or module.running_var is None:
        raise NotClosedForm(f"{node.target}: batch norm without running statistics (or in training mode)")
    var = module.running_var.detach().double().numpy()
    mean = module.running_mean.detach().double().numpy()
    scale = 1.0 / np.sqrt(var + module.eps)
    shift = -mean * scale
    if module.affine:
        gamma, beta = module.weight.detach().double().numpy(), module.bias.detach().double().numpy()
        scale, shift = scale * gamma, shift * gamma + beta
    return ("affine", scale, shift)  # diagonal


_ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu"}


def _activation(module: nn.Module, node, raw: bool):
    t = type(module)
    if t is nn.Identity:
        return None
    if t not in _ACTIVATIONS:
        raise NotClosedForm(f"{node.target}: activation {t.__name__} is not one the closed form differentiates")
    if raw and getattr(module, "inplace", False):
        raise NotClosedForm(f"{node.target}: in-place activation on the target layer's output")
    return ("act", _ACTIVATIONS[t])


def _is_one(size) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size))


def _conv_types() -> tuple:
    try:
        from timm.layers import Conv2dSame  # 'same' padding is none for a 1x1, stride-1 kernel

        return (nn.Conv2d, Conv2dSame)
    except ImportError:
        return (nn.Conv2d,)


def _norm_act_type():
    try:
        from timm.layers.norm_act import BatchNormAct2d

        return BatchNormAct2d
    except ImportError:
        return None


def _select_pool_type():
    try:
        from timm.layers import SelectAdaptivePool2d

        return SelectAdaptivePool2d
    except ImportError:
        return None


# ----------------------------------------------------------------------------------------------
# The maps


def _act(name: str, z: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(z, 0)
    if name == "relu6":
        return np.clip(z, 0, 6)
    if name == "silu":
        with np.errstate(over="ignore"):
            return z / (1 + np.exp(-z))
    raise ChestDxError(f"closed-form CAM: unknown activation {name!r}")


def _act_grad(name: str, z: np.ndarray) -> np.ndarray:
    """The derivative autograd uses: relu's is 0 at 0; hardtanh's (ReLU6) 0 at both ends."""
    if name == "relu":
        return (z > 0).astype(z.dtype)
    if name == "relu6":
        return ((z > 0) & (z < 6)).astype(z.dtype)
    if name == "silu":  # silu_backward: sigmoid(z) (1 + z (1 - sigmoid(z)))
        with np.errstate(over="ignore"):
            s = 1 / (1 + np.exp(-z))
        return s * (1 + z * (1 - s))
    raise ChestDxError(f"closed-form CAM: unknown activation {name!r}")


def _member_forward(a: np.ndarray, member: dict) -> tuple[np.ndarray, list]:
    """Pooled features (B, C') and the pre-activations of the pointwise chain, from A (B, C, h, w)."""
    x = a.reshape(a.shape[0], a.shape[1], -1)
    pre = []
    for op in member["pointwise"]:
        if op["op"] == "affine":
            x = np.matmul(op["weight"], x) + op["bias"][None, :, None]
        else:
            pre.append(x)
            x = _act(op["name"], x)
    return x.mean(-1), pre


def _member_grads(a: np.ndarray, member: dict, pre: list, v: np.ndarray) -> np.ndarray:
    """dy/dA (B, C, h, w) from v = dy/dP (B, C'): the pooling's 1/hw, then the chain's transposed Jacobian."""
    b, c, h, w = a.shape
    g = (v / (h * w))[:, :, None].astype(np.float32)
    acts = iter(reversed(pre))
    for op in reversed(member["pointwise"]):
        if op["op"] == "affine":
            g = np.matmul(op["weight"].T, g)
        else:
            g = g * _act_grad(op["name"], next(acts))
    return np.broadcast_to(g, (b, c, h * w)).reshape(b, c, h, w)


def _cam_weights(method: str, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    axes = (2, 3)
    if method == "cam":
        return g.sum(axis=axes)
    if method == "gradcam":  # Selvaraju et al. Eq. 1
        return g.mean(axis=axes)
    # Chattopadhyay et al. Eq. 19 with Y_c = exp(y_c), as pytorch_grad_cam.GradCAMPlusPlus computes it.
    g2 = g ** 2
    g3 = g2 * g
    sum_a = a.sum(axis=axes)[:, :, None, None]
    aij = g2 / (2 * g2 + sum_a * g3 + _GRADCAMPP_EPS)
    aij = np.where(g != 0, aij, 0)
    return (np.maximum(g, 0) * aij).sum(axis=axes)


def _scale(cams: np.ndarray, size=None) -> np.ndarray:
    """pytorch_grad_cam.utils.image.scale_cam_image: per-map min-max, then OpenCV's bilinear resize."""
    import cv2

    out = []
    for img in cams:
        img = img - np.min(img)
        img = img / (_SCALE_EPS + np.max(img))
        if size is not None:
            img = cv2.resize(np.float32(img), (int(size[1]), int(size[0])))
        out.append(img)
    return np.float32(out)


def _score_grads(spec: dict, heads: list, logits: list[dict], columns: np.ndarray) -> list[list[dict]]:
    """d(score column)/d(member logits) per target: [t][m][output] (B, *shape), by autograd through
    the tasks' `combine` (an ensemble) and `score_columns` on the logits alone."""
    leaves = [{k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in member.items()}
              for member in logits]
    with torch.enable_grad():
        if spec["ensemble"]:  # Ensemble.forward
            out = {h.output: h.kind.combine([m[h.output] for m in leaves]) for h in heads}
        else:
            out = leaves[0]
        scores = score_matrix(out, heads)
    flat = [(m, k, t) for m, member in enumerate(leaves) for k, t in member.items()]
    rows = torch.arange(len(columns))
    result = []
    for t in range(columns.shape[1]):
        picked = scores[rows, torch.as_tensor(columns[:, t], dtype=torch.long)].sum()
        grads = torch.autograd.grad(picked, [leaf for _, _, leaf in flat], retain_graph=True, allow_unused=True)
        per = [dict() for _ in leaves]
        for (m, k, leaf), g in zip(flat, grads):
            per[m][k] = (torch.zeros_like(leaf) if g is None else g).numpy()
        result.append(per)
    return result


def closed_form_maps(features, spec: dict, columns, method: str = "gradcam++", input_hw=None) -> np.ndarray:
    """Maps (B, T, H, W) in [0, 1], as `explain(model, x, method, ...)` returns them for the score
    columns `columns` (B, T) (each image's explained column per target).

    features: the target layers' outputs, (B, C, h, w) each: a dict by feature name (the ONNX outputs)
    or a list in the spec's member order. input_hw: the input's (H, W) (default: the spec's)."""
    method = method_name(method)
    if method not in CLOSED_FORM_METHODS:
        raise ChestDxError(f"closed-form maps exist for {', '.join(CLOSED_FORM_METHODS)}, not {method!r}")
    members = spec["members"]
    if isinstance(features, dict):
        features = [features[m["feature"]] for m in members]
    feats = [np.ascontiguousarray(np.asarray(f.numpy() if isinstance(f, torch.Tensor) else f, dtype=np.float32))
             for f in features]
    if len(feats) != len(members) or any(f.ndim != 4 for f in feats):
        raise ChestDxError("closed-form CAM: one (B, C, h, w) feature map per member expected")
    input_hw = tuple(input_hw if input_hw is not None else spec["input_hw"])
    columns = np.asarray(columns).reshape(len(feats[0]), -1)
    heads = heads_from(spec["heads"])
    forward = [_member_forward(a, m) for a, m in zip(feats, members)]
    logits = []
    for (pooled, _), m in zip(forward, members):
        logits.append({name: (pooled @ o["weight"].reshape(-1, pooled.shape[1]).T + o["bias"].reshape(-1))
                       .reshape(len(pooled), *o["weight"].shape[:-1]) for name, o in m["outputs"].items()})
    per_target = []
    for grads in _score_grads(spec, heads, logits, columns):
        layer_maps = []
        for a, m, (pooled, pre), d in zip(feats, members, forward, grads):
            v = sum(d[name].reshape(len(a), -1) @ o["weight"].reshape(-1, pooled.shape[1])
                    for name, o in m["outputs"].items())
            g = _member_grads(a, m, pre, np.asarray(v, dtype=np.float32))
            weights = _cam_weights(method, a, g)
            cam = np.maximum((weights[:, :, None, None] * a).sum(axis=1), 0)  # Grad-CAM Eq. 2
            layer_maps.append(_scale(cam, input_hw)[:, None])
        stacked = np.maximum(np.concatenate(layer_maps, axis=1), 0)
        per_target.append(_scale(stacked.mean(axis=1)))
    return np.stack(per_target, axis=1).astype(np.float32)


def explain_outputs(out: dict, spec: dict, method: str = "gradcam++", target="predicted",
                    input_hw=None) -> Explanation:
    """`explain`'s answer from one forward pass's outputs: the head outputs (the logits) and the
    target layers' feature maps (an ONNX export's extra outputs), no backward pass."""
    heads = heads_from(spec["heads"])
    names, n_classes = column_names(heads), len(heads[0].labels)
    specs = resolve_targets(target, names, n_classes)
    scores = score_matrix({h.output: torch.as_tensor(np.asarray(out[h.output])) for h in heads}, heads)
    probs = score_probabilities(scores, heads)
    predicted = probs[:, :n_classes].argmax(1).numpy()
    n = len(scores)
    columns = np.stack([predicted if col is None else np.full(n, col) for _, col in specs], axis=1)
    maps = closed_form_maps({m["feature"]: out[m["feature"]] for m in spec["members"]}, spec, columns, method,
                            input_hw)
    return Explanation(maps, [label for label, _ in specs], columns, names, probs.numpy())


def heatmaps_from_outputs(out: dict, spec: dict, method: str = "gradcam++", target="predicted",
                          input_hw=None) -> np.ndarray:
    """Maps (B, T, H, W) in [0, 1] from an output dict that holds the feature maps (e.g.
    `OnnxModel(x, features=True)`); `spec`: `OnnxModel.cam_spec` (`load_spec` of the export's metadata).
    T: one map per target (one for "predicted")."""
    if not spec:
        raise ChestDxError("this model has no closed-form CAM; use chestdx.explain.explain")
    return explain_outputs(out, spec, method, target, input_hw).maps


# ----------------------------------------------------------------------------------------------
# Saving beside an ONNX export


def save_spec(spec: dict, npz_path) -> dict:
    """Write the spec's arrays to `npz_path`; return the JSON part (arrays named by their npz key,
    the file's name and SHA-256)."""
    from chestdx.utils import atomic_path

    arrays = {}

    def strip(obj, key):
        if isinstance(obj, np.ndarray):
            arrays[key] = obj
            return {"npz": key}
        if isinstance(obj, dict):
            return {k: strip(v, f"{key}.{k}" if key else k) for k, v in obj.items()}
        if isinstance(obj, list):
            return [strip(v, f"{key}.{i}") for i, v in enumerate(obj)]
        return obj

    meta = strip(spec, "")
    npz_path = Path(npz_path)
    with atomic_path(npz_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    meta["file"] = npz_path.name
    meta["sha256"] = hashlib.sha256(npz_path.read_bytes()).hexdigest()
    return meta


def load_spec(meta: dict, folder) -> dict:
    """The spec saved by `save_spec` (its npz in `folder`); ChestDxError if missing or changed."""
    path = Path(folder) / meta["file"]
    if not path.is_file():
        raise ChestDxError(f"{path}: closed-form CAM weights missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise ChestDxError(f"{path}: closed-form CAM weights do not match the export's metadata")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}

    def fill(obj):
        if isinstance(obj, dict):
            if set(obj) == {"npz"}:
                return arrays[obj["npz"]]
            return {k: fill(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [fill(v) for v in obj]
        return obj

    spec = fill({k: v for k, v in meta.items() if k not in ("file", "sha256")})
    if spec.get("form") != FORM:
        raise ChestDxError(f"{path}: closed-form CAM of form {spec.get('form')!r}, expected {FORM}")
    return spec
