"""Low-rank factorisation of conv and linear layers.

* Linear and 1x1 conv: truncated SVD, W ~ (U sqrt(S)) (sqrt(S) V^T), two thinner layers (Denton et al.
  2014, "Exploiting Linear Structure Within Convolutional Networks for Efficient Evaluation").
* kxk conv: Tucker-2 decomposition over the output and input channel modes (Kim et al. 2016,
  "Compression of Deep Convolutional Neural Networks for Fast and Low Power Mobile Applications"):
  1x1 conv (in -> r_in), kxk core conv (r_in -> r_out, original stride/padding), 1x1 conv (r_out ->
  out, original bias). Factors from HOSVD refined by two HOOI sweeps.

Ranks are given directly (`rank`) or chosen per layer as the smallest keeping a fraction `energy` of
the squared singular values. A layer is left alone when its factorisation would not reduce its MACs
(depthwise and grouped convs are never factorised).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from zoo.compress._common import (add_step, check_model, copy_model, eval_mode, example_input, get_module,
                                  has_parametrizations, is_quantized_model, set_module, steps)
from zoo.errors import ZooError


def _rank_for(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    if rank is not None:
        return max(1, min(rank, s.numel()))
    e = torch.cumsum(s.double() ** 2, 0)
    e = e / e[-1] if e[-1] > 0 else torch.ones_like(e)
    return int(torch.searchsorted(e, torch.tensor(energy, dtype=e.dtype) - 1e-12).item()) + 1


def _gram_eig(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(singular values descending, left singular vectors) of mat from the eigendecomposition of mat mat^T."""
    ev, vec = torch.linalg.eigh(mat @ mat.T)
    ev, vec = ev.flip(0).clamp_min(0), vec.flip(1)
    return ev.sqrt(), vec


def _leading(mat: torch.Tensor, r: int) -> torch.Tensor:
    return _gram_eig(mat)[1][:, :r]


def _svd_layers(m: nn.Module, r: int, w: torch.Tensor | None,
                usv: tuple[torch.Tensor, ...] | None = None) -> nn.Sequential:
    """Two-layer factorisation of a Linear or 1x1 conv (weights from w and its SVD usv, or empty)."""
    if isinstance(m, nn.Linear):
        a, b = nn.Linear(m.in_features, r, bias=False), nn.Linear(r, m.out_features, bias=m.bias is not None)
    else:
        a = nn.Conv2d(m.in_channels, r, 1, m.stride, m.padding, m.dilation, bias=False, padding_mode=m.padding_mode)
        b = nn.Conv2d(r, m.out_channels, 1, bias=m.bias is not None)
    if w is not None:
        u, s, vh = usv
        sq = s[:r].sqrt()
        with torch.no_grad():
            a.weight.copy_((sq[:, None] * vh[:r]).reshape(a.weight.shape).to(w.dtype))
            b.weight.copy_((u[:, :r] * sq[None, :]).reshape(b.weight.shape).to(w.dtype))
            if m.bias is not None:
                b.bias.copy_(m.bias)
    return nn.Sequential(a, b)


def _tucker_layers(m: nn.Conv2d, r_out: int, r_in: int, w: torch.Tensor | None) -> nn.Sequential:
    """1x1 -> kxk core -> 1x1 factorisation of a kxk conv (weights from w, or empty if w is None)."""
    first = nn.Conv2d(m.in_channels, r_in, 1, bias=False)
    core = nn.Conv2d(r_in, r_out, m.kernel_size, m.stride, m.padding, m.dilation, bias=False,
                     padding_mode=m.padding_mode)
    last = nn.Conv2d(r_out, m.out_channels, 1, bias=m.bias is not None)
    if w is not None:
        W = w.double()
        o, i = W.shape[:2]
        u0 = _leading(W.reshape(o, -1), r_out)
        u1 = _leading(W.transpose(0, 1).reshape(i, -1), r_in)
        for _ in range(2):  # HOOI sweeps
            u0 = _leading(torch.einsum("oikl,is->oskl", W, u1).reshape(o, -1), r_out)
            u1 = _leading(torch.einsum("oikl,or->irkl", W, u0).reshape(i, -1), r_in)
        g = torch.einsum("oikl,or,is->rskl", W, u0, u1)
        with torch.no_grad():
            first.weight.copy_(u1.t()[:, :, None, None].to(w.dtype))
            core.weight.copy_(g.to(w.dtype))
            last.weight.copy_(u0[:, :, None, None].to(w.dtype))
            if m.bias is not None:
                last.bias.copy_(m.bias)
    return nn.Sequential(first, core, last)


def _shapes(model: nn.Module, x: torch.Tensor, mods: list[nn.Module]) -> dict[int, tuple[tuple, tuple]]:
    shapes: dict[int, tuple[tuple, tuple]] = {}

    def hook(mod: nn.Module, inp: Any, out: Any) -> None:
        """Record the input and output shapes of the first call."""
        shapes.setdefault(id(mod), (tuple(inp[0].shape), tuple(out.shape)))

    hs = [m.register_forward_hook(hook) for m in mods]
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in hs:
            h.remove()
    return shapes


def _spatial(shape: tuple) -> int:
    return int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1


def low_rank(model: nn.Module, rank: int | None = None, energy: float | None = None, *,
             example_inputs: torch.Tensor | None = None, inplace: bool = False) -> nn.Module:
    """Factorise Linear / 1x1 convs (SVD) and kxk convs (Tucker-2) by `rank` or kept `energy`.

    MACs are estimated at `example_inputs`' size, else at the model's default input size.
    Exactly one of rank (int >= 1, capped per layer) or energy (fraction in (0, 1] of the squared
    singular values kept) must be given. Layers whose factorisation would not reduce MACs are skipped;
    the step recorded in the spec lists factorised and skipped layers. Returns a copy unless inplace.
    """
    check_model("low_rank", model)
    if (rank is None) == (energy is None):
        raise ZooError(f"low_rank: give exactly one of rank or energy (got rank={rank!r}, energy={energy!r})")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ZooError(f"low_rank: rank={rank!r} is not allowed; expected an int >= 1")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0.0 < float(energy) <= 1.0):
        raise ZooError(f"low_rank: energy={energy!r} is not allowed; expected a float in (0, 1]")
    if is_quantized_model(model) or any(s.get("kind") in ("int8", "weightquant") for s in steps(model)):
        raise ZooError("low_rank: the model is quantized; factorise the float model before quantizing it")
    if has_parametrizations(model):
        raise ZooError("low_rank: the model has weight masks; call zoo.compress.make_permanent(model) first")
    model = copy_model(model, inplace)
    x = example_input(model, example_inputs, "low_rank", smallest=False)
    cands = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
    shapes = _shapes(model, x, [m for _, m in cands])
    done: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for path, m in cands:
        if id(m) not in shapes:
            skipped[path] = "not called in the forward pass"
            continue
        (ishape, oshape) = shapes[id(m)]
        w = m.weight.detach()
        if isinstance(m, nn.Linear) or m.kernel_size == (1, 1):
            usv = torch.linalg.svd(w.reshape(w.shape[0], -1).double(), full_matrices=False)
            r = _rank_for(usv[1], rank, float(energy) if energy is not None else None)
            n_in = w.shape[1]
            before, after = n_in * w.shape[0], r * (n_in + w.shape[0])
            if after >= before:
                skipped[path] = f"rank {r} would not reduce MACs"
                continue
            new = _svd_layers(m, r, w, usv)
            done[path] = {"method": "svd", "ranks": [r]}
        else:
            o, i = w.shape[:2]
            k2 = w.shape[2] * w.shape[3]
            s0 = _gram_eig(w.reshape(o, -1).double())[0]
            s1 = _gram_eig(w.transpose(0, 1).reshape(i, -1).double())[0]
            e = float(energy) if energy is not None else None
            r_out, r_in = _rank_for(s0, rank, e), _rank_for(s1, rank, e)
            hw_in, hw_out = _spatial(ishape), _spatial(oshape)
            before = hw_out * o * i * k2
            after = hw_in * i * r_in + hw_out * (r_in * r_out * k2 + r_out * o)
            if after >= before:
                skipped[path] = f"ranks ({r_out}, {r_in}) would not reduce MACs"
                continue
            new = _tucker_layers(m, r_out, r_in, w)
            done[path] = {"method": "tucker2", "ranks": [r_out, r_in]}
        new.train(m.training)
        set_module(model, path, new.to(w.device))
    add_step(model, {"kind": "lowrank", "modules": done, "skipped": skipped})
    return model


def rebuild(model: nn.Module, step: dict[str, Any]) -> None:
    """Recreate the factorised structure recorded in a spec step (weights are loaded afterwards)."""
    for path, d in step["modules"].items():
        m = get_module(model, path)
        if d["method"] == "svd":
            new = _svd_layers(m, d["ranks"][0], None)
        elif d["method"] == "tucker2":
            new = _tucker_layers(m, d["ranks"][0], d["ranks"][1], None)
        else:
            raise ZooError(f"spec: unknown low-rank method {d['method']!r} at {path!r}")
        set_module(model, path, new)
