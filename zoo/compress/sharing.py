"""Weight sharing by per-layer k-means: Han, Mao & Dally 2016, "Deep Compression: Compressing Deep Neural
Networks with Pruning, Trained Quantization and Huffman Coding" (ICLR), section 3.

`share_weights(model, bits)` clusters the kept (nonzero) weights of each chosen conv / linear layer into
2^bits shared values with 1-D k-means started from centroids spaced linearly between the layer's smallest
and largest weight (the paper's best initialisation, section 3.2). Bits are set per layer kind (`{"conv":
8, "fc": 5}`, the paper's AlexNet choice) or per layer path. Each layer then holds a `SharedWeight`
parametrization: the trainable parameter is the codebook of centroids, the layer's weight is
`centroids[index] * keep`, so backpropagation sums the gradients of every weight of a cluster into its
centroid (section 3.3) and pruned weights stay exactly zero.

The `share` step recorded in the spec (`{"kind": "share", "modules": {path: bits}}`) lets
zoo.compress.serialize rebuild the structure; zoo.compress.deepfile stores the index and keep tensors
sparse and Huffman-coded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from zoo.compress._common import add_step, check_model, copy_model, get_module, is_quantized_model, weight_layers
from zoo.compress.pruning import make_permanent, masked_layers
from zoo.errors import ZooError
from zoo.untrusted import short_repr

LAYER_KINDS = {"conv": nn.Conv2d, "fc": nn.Linear}  # keys of a per-kind `bits` mapping
MIN_BITS, MAX_BITS = 1, 8
KMEANS_ITERS = 100  # Lloyd iterations at most (1-D k-means converges in far fewer on these layers)


class SharedWeight(nn.Module):
    """Parametrization: weight = centroids[index] * keep; the centroids are the trained `original`."""

    def __init__(self, bits: int, index: torch.Tensor, keep: torch.Tensor) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("idx", index.to(torch.uint8))
        self.register_buffer("mask", keep.to(torch.bool))

    def forward(self, centroids: torch.Tensor) -> torch.Tensor:
        """The shared weight; its gradient w.r.t. each centroid is the sum over that centroid's cluster."""
        return centroids[self.idx.long()] * self.mask

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """Centroids from a weight: the mean of each cluster's kept entries (0 for an empty cluster)."""
        k = 2 ** self.bits
        keep = self.mask.reshape(-1)
        idx = self.idx.reshape(-1).long()[keep]
        vals = w.detach().reshape(-1)[keep].double()
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, vals)
        counts = torch.bincount(idx, minlength=k).double()
        return torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums)).to(w.dtype)


def linear_kmeans(values: torch.Tensor, k: int, iters: int = KMEANS_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means with linear initialisation: (float32 centroids (k,), cluster index of each value).

    Centroids of clusters left empty are set to 0: they stay 0 while training (no gradient), and the deep
    file does not store them."""
    v = values.detach().reshape(-1).double().cpu()
    if v.numel() == 0:
        return torch.zeros(k), torch.zeros(0, dtype=torch.long)
    lo, hi = float(v.min()), float(v.max())
    cent = torch.linspace(lo, hi, k, dtype=torch.float64)
    assign = None
    for _ in range(iters):
        new = _nearest(v, cent)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, v)
        counts = torch.bincount(assign, minlength=k).double()
        cent = torch.where(counts > 0, sums / counts.clamp_min(1), cent)
    cent32 = cent.float()
    assign = _nearest(v.float(), cent32)
    return torch.where(torch.bincount(assign, minlength=k) > 0, cent32, torch.zeros_like(cent32)), assign


def _nearest(v: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each value (centroids sorted ascending; ties go to the lower one)."""
    order = torch.argsort(cent)
    s = cent[order]
    mid = (s[1:] + s[:-1]) / 2
    return order[torch.bucketize(v, mid, right=False)]


def _check_bits(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        raise ZooError(f"share_weights: {where}={short_repr(value)} is not allowed; expected an int in "
                       f"{MIN_BITS}..{MAX_BITS} (bits per shared weight: 2^bits clusters)")
    return value


def layer_bits(model: nn.Module, bits: int | Mapping[str, int]) -> dict[str, int]:
    """Layer path -> bits for `bits` given as one int, or a mapping of layer kinds (conv, fc) and/or paths."""
    layers = weight_layers(model)
    if not isinstance(bits, Mapping):
        b = _check_bits(bits, "bits")
        return {n: b for n, _ in layers}
    names = [n for n, _ in layers]
    out: dict[str, int] = {}
    for key in bits:  # kinds first, then paths override them
        if key not in LAYER_KINDS and key not in names:
            raise ZooError(f"share_weights: bits key {short_repr(key)} is not a layer kind or a conv/linear layer of "
                           f"this model; allowed: {', '.join(LAYER_KINDS)}, " + ", ".join(names))
    for key, kind in LAYER_KINDS.items():
        if key in bits:
            b = _check_bits(bits[key], f"bits[{key!r}]")
            out.update({n: b for n, m in layers if isinstance(m, kind)})
    for key in bits:
        if key in names:
            out[key] = _check_bits(bits[key], f"bits[{key!r}]")
    if not out:
        raise ZooError(f"share_weights: bits={short_repr(dict(bits))} selects no layer of this model")
    return {n: out[n] for n in names if n in out}


def shared_layers(model: nn.Module) -> list[tuple[str, nn.Module, SharedWeight]]:
    """(path, module, its SharedWeight) of every layer whose weight is shared."""
    out = []
    for n, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            p = m.parametrizations.weight[0]
            if isinstance(p, SharedWeight):
                out.append((n, m, p))
    return out


def attach(m: nn.Module, bits: int, index: torch.Tensor, keep: torch.Tensor) -> SharedWeight:
    """Put a SharedWeight of these indices and keep mask on a layer (centroids from its current weight)."""
    p = SharedWeight(bits, index.reshape(m.weight.shape), keep.reshape(m.weight.shape))
    parametrize.register_parametrization(m, "weight", p)
    return p


def share_weights(model: nn.Module, bits: int | Mapping[str, int] = 5, inplace: bool = False) -> nn.Module:
    """Cluster each chosen layer's kept weights into 2^bits shared values (per-layer k-means, linear init).

    `bits`: one int for every conv/linear layer, or a mapping of layer kinds ('conv', 'fc') and/or layer
    paths to ints in 1..8 (layers it does not name stay unshared). Pruning masks are made permanent first;
    zero weights count as pruned and stay zero. Returns a copy (unless inplace) with a `share` step recorded.
    """
    check_model("share_weights", model)
    if is_quantized_model(model):
        raise ZooError("share_weights: the model is int8-quantized; share the weights of a float model")
    plan = layer_bits(model, bits)
    model = copy_model(model, inplace)
    if masked_layers(model):
        make_permanent(model)
    for path in plan:
        m = get_module(model, path)
        if parametrize.is_parametrized(m, "weight"):
            raise ZooError(f"share_weights: layer {path!r} already has a {type(m.parametrizations.weight[0]).__name__}"
                           " parametrization; share the weights of a plain float layer")
    with torch.no_grad():
        for path, b in plan.items():
            m = get_module(model, path)
            w = m.weight.detach()
            keep = w != 0
            cent, assign = linear_kmeans(w[keep], 2 ** b)
            index = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
            index[keep] = assign.to(torch.uint8).to(w.device)
            attach(m, b, index, keep)
            m.parametrizations.weight.original.copy_(cent.to(w.device, w.dtype))
    add_step(model, {"kind": "share", "modules": dict(plan)})
    return model


def rebuild(model: nn.Module, step: dict[str, Any]) -> None:
    """Recreate a recorded share step's structure (all-zero indices, all kept; the file fills them in)."""
    for path, b in step["modules"].items():
        _check_bits(b, f"modules[{path!r}]")
        m = get_module(model, path)
        attach(m, b, torch.zeros(m.weight.shape, dtype=torch.uint8), torch.ones(m.weight.shape, dtype=torch.bool))
