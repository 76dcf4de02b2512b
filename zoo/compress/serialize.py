"""The tensor codec of compressed models, and `build_from_spec`, which replays a spec's compression steps.

Checkpoint files are read and written by zoo.weights.checkpoint (the one loader and writer); it calls
`encode_state` to store a compressed model and `build_from_spec` + `load_state` to rebuild one.

The state dict of a compressed model holds things safetensors cannot store (int8 quantized tensors,
packed-parameter tuples, dtypes) or stores wastefully (binary weights as float32). `encode_state`
turns it into plain tensors whose names carry a `#` suffix saying how to decode them:

  K#qt.int/.sz                   per-tensor quantized tensor (int repr, [scale, zero point])
  K#qc<axis>.int/.scales/.zps    per-channel quantized tensor (.zps left out when all zero)
  K#t0, K#t1 ... / K#none        tuple elements / None
  K#dtype                        a torch dtype (one-byte code)
  K#bits / K#shape               bool mask, 1 bit per element
  K#bin / K#tern / K#kb<k>, K#alpha binary, ternary, k-bit latent weights: packed codes (+ alpha)

To avoid the int8 reload failure of torchvision issue #5890, loading never guesses: `build_from_spec`
recreates the exact module structure (zoo.create, then each recorded step), and the decoded tensors,
scales and zero points are loaded into it (`load_state`; a rebuilt model's own `load_state_dict` is
routed there, so `model.load_state_dict(file_tensors)` works too).
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from zoo._registry import MAX_PARAMS, check_param_budget, create, meta_model
from zoo.compress.actgrid import rebuild as actgrid_rebuild
from zoo.compress._common import has_parametrizations, is_quantized_model, set_steps, steps
from zoo.compress.lowrank import rebuild as lowrank_rebuild
from zoo.compress import pt2e
from zoo.compress.pruning import register_masks
from zoo.compress.quantization import rebuild as quant_rebuild
from zoo.compress.sharing import rebuild as share_rebuild
from zoo.compress.surgery import rebuild_structure
from zoo.compress.weightquant import BinaryWeight, KBitWeight, TernaryWeight
from zoo.errors import ZooError
from zoo.spec import model_name
from zoo.untrusted import check_spec, clip, short_repr

_DTYPES = [torch.qint8, torch.quint8, torch.qint32, torch.float32, torch.float16, torch.bfloat16, torch.float64,
           torch.int8, torch.uint8, torch.int32, torch.int64]


def pack_bits(codes: torch.Tensor, k: int) -> torch.Tensor:
    """Pack unsigned codes < 2^k, k bits each, into a uint8 tensor."""
    c = codes.reshape(-1).to(torch.uint8).cpu().numpy()
    bits = np.unpackbits(c[:, None], axis=1)[:, 8 - k:]
    return torch.from_numpy(np.packbits(bits.reshape(-1)).copy())


def unpack_bits(packed: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: n codes of k bits as uint8."""
    bits = np.unpackbits(packed.cpu().numpy())[: n * k].reshape(n, k)
    full = np.zeros((n, 8), dtype=np.uint8)
    full[:, 8 - k:] = bits
    return torch.from_numpy(np.packbits(full, axis=1).reshape(-1).copy())


def _small_int(t: torch.Tensor) -> torch.Tensor:
    for dt in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dt)
        if t.numel() == 0 or (int(t.min()) >= info.min and int(t.max()) <= info.max):
            return t.to(dt)
    return t.to(torch.int64)


def is_compressed(model: nn.Module) -> bool:
    """True if the model needs the compressed encoding (steps recorded, quantized or parametrized)."""
    return bool(steps(model)) or is_quantized_model(model) or has_parametrizations(model)


def _encode_value(key: str, v: Any, out: dict[str, torch.Tensor]) -> None:
    if v is None:
        out[f"{key}#none"] = torch.zeros(0, dtype=torch.uint8)
    elif isinstance(v, torch.dtype):
        out[f"{key}#dtype"] = torch.tensor([_DTYPES.index(v)], dtype=torch.uint8)
    elif isinstance(v, (tuple, list)):
        for i, e in enumerate(v):
            _encode_value(f"{key}#t{i}", e, out)
    elif isinstance(v, torch.Tensor) and v.is_quantized:
        v = v.detach().cpu()
        if v.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            out[f"{key}#qt.int"] = v.int_repr().contiguous()
            out[f"{key}#qt.sz"] = torch.tensor([v.q_scale(), v.q_zero_point()], dtype=torch.float64)
        else:
            scales, zps, axis = v.q_per_channel_scales(), v.q_per_channel_zero_points(), v.q_per_channel_axis()
            s32 = scales.float()
            out[f"{key}#qc{axis}.int"] = v.int_repr().contiguous()
            out[f"{key}#qc{axis}.scales"] = s32 if torch.equal(s32.double(), scales.double()) else scales.double()
            if bool(zps.any()):  # symmetric weights have all-zero zero points: not stored
                out[f"{key}#qc{axis}.zps"] = _small_int(zps)
    elif isinstance(v, torch.Tensor):
        out[key] = v.detach().cpu().contiguous().clone()
    else:
        raise ZooError(f"serialize: cannot store state entry {key!r} of type {type(v).__name__}")


def encode_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain, de-aliased tensors encoding the model's full state (see the module docstring)."""
    if pt2e.is_pt2e(model):  # a torchao PT2E int8 graph: its own encoding (see zoo.compress.pt2e)
        return pt2e.encode_state(model)
    sd = model.state_dict(keep_vars=False)
    special: dict[str, tuple[str, nn.Module, nn.Module]] = {}  # original key -> (kind, module, param)
    for name, m in model.named_modules():
        if not parametrize.is_parametrized(m):
            continue
        for pname, plist in m.parametrizations.items():
            p0 = plist[0]
            key = f"{name}.parametrizations.{pname}.original" if name else f"parametrizations.{pname}.original"
            special[key] = ("p", m, p0)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in special:
            _, m, p0 = special[k]
            w = v.detach().cpu()
            if isinstance(p0, BinaryWeight):
                codes, alpha = BinaryWeight.codes(w)
                out[f"{k}#bin"], out[f"{k}#alpha"] = pack_bits(codes, 1), alpha.float().contiguous()
                out[f"{k}#shape"] = torch.tensor(w.shape, dtype=torch.int64)
                continue
            if isinstance(p0, TernaryWeight):
                codes, alpha = TernaryWeight.codes(w)
                out[f"{k}#tern"], out[f"{k}#alpha"] = pack_bits(codes, 2), alpha.float().contiguous()
                out[f"{k}#shape"] = torch.tensor(w.shape, dtype=torch.int64)
                continue
            if isinstance(p0, KBitWeight):
                out[f"{k}#kb{p0.bits}"] = pack_bits(p0.codes(w.to(p0.scale.device)).cpu(), p0.bits)
                out[f"{k}#shape"] = torch.tensor(w.shape, dtype=torch.int64)
                continue
            # WeightMask: the stored weight is dense with zeros where masked
        if k.endswith(".mask") and isinstance(v, torch.Tensor) and v.dtype == torch.bool:
            out[f"{k}#bits"] = pack_bits(v.to(torch.uint8), 1)
            out[f"{k}#shape"] = torch.tensor(v.shape, dtype=torch.int64)
            continue
        _encode_value(k, v, out)
    return out


def _decode_value(parts: dict[str, torch.Tensor]) -> Any:
    """Rebuild one state entry from its '#'-suffixed parts (keys are the suffixes)."""
    if "none" in parts:
        return None
    if "dtype" in parts:
        return _DTYPES[int(parts["dtype"][0])]
    if any(s.startswith("t") and s[1:2].isdigit() for s in parts):
        items: dict[int, dict[str, torch.Tensor]] = {}
        for s, t in parts.items():
            head, _, rest = s.partition("#")
            items.setdefault(int(head[1:]), {})[rest] = t
        return tuple(_decode_value(items[i]) for i in sorted(items))
    if "qt.int" in parts:
        sz = parts["qt.sz"]
        return torch._make_per_tensor_quantized_tensor(parts["qt.int"], float(sz[0]), int(sz[1]))
    qc = [s for s in parts if s.startswith("qc") and s.endswith(".int")]
    if qc:
        pre = qc[0][: -len(".int")]
        scales = parts[f"{pre}.scales"].double()
        zps = parts.get(f"{pre}.zps")
        zps = torch.zeros(scales.numel(), dtype=torch.long) if zps is None else zps.long()
        return torch._make_per_channel_quantized_tensor(parts[f"{pre}.int"], scales, zps, int(pre[2:]))
    if "bits" in parts:
        shape = tuple(parts["shape"].tolist())
        n = int(np.prod(shape)) if shape else 1
        return unpack_bits(parts["bits"], 1, n).reshape(shape).to(torch.bool)
    if "" in parts:
        return parts[""]
    raise ZooError(f"serialize: cannot decode a state entry with parts {sorted(parts)}")


def decode_state(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The state dict (quantized tensors, tuples, masks, latent weights) encoded by `encode_state`."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        base, sep, rest = k.partition("#")
        grouped.setdefault(base, {})[rest if sep else ""] = v
    out: dict[str, Any] = {}
    latent = {}
    for base, parts in grouped.items():
        kinds = [s for s in parts if s in ("bin", "tern") or s.startswith("kb")]
        if kinds:
            latent[base] = (kinds[0], parts)
            continue
        out[base] = _decode_value(parts)
    for base, (kind, parts) in latent.items():
        shape = tuple(parts["shape"].tolist())
        n = int(np.prod(shape))
        if kind == "bin":
            out[base] = BinaryWeight.latent(unpack_bits(parts["bin"], 1, n), parts["alpha"], shape)
        elif kind == "tern":
            out[base] = TernaryWeight.latent(unpack_bits(parts["tern"], 2, n), parts["alpha"], shape)
        else:
            k = int(kind[2:])
            scale_key = base[: -len("original")] + "0.scale"
            if scale_key not in out:
                raise ZooError(f"serialize: {base!r} has k-bit codes but no scale {scale_key!r}")
            p = KBitWeight(k, out[scale_key])
            out[base] = p.latent(unpack_bits(parts[kind], k, n), shape)
    return out


def load_state(model: nn.Module, tensors: dict[str, Any], strict: bool = True) -> Any:
    """Load encoded (or plain) tensors into a model of the right structure.

    The decoded dict carries the module versions of `model` as `_metadata`: torch.ao's quantized
    Linear reads its packed-weight layout from them, and safetensors files have none.
    """
    if pt2e.is_pt2e(model):
        return pt2e.load_state(model, tensors)
    if any(isinstance(k, str) and "#" in k for k in tensors):
        try:
            tensors = decode_state(tensors)
        except ZooError:
            raise
        except _REBUILD_ERRORS as e:  # encoded parts written by someone else: one message, not a torch error
            raise ZooError(f"serialize: the encoded tensors do not decode: {type(e).__name__}: "
                           f"{clip(str(e), 160)}") from None
    sd = OrderedDict(tensors)
    sd._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    return nn.Module.load_state_dict(model, sd, strict=strict)


def install_decoder(model: nn.Module) -> None:
    """Make `model.load_state_dict` accept the encoded tensors of a saved file (see load_state)."""
    model.load_state_dict = functools.partial(load_state, model)


STEP_CONTAINERS: dict[str, dict[str, type]] = {  # kind -> keys every step of that kind needs, with their type
    "channels": {"modules": dict}, "mask": {"modules": list}, "lowrank": {"modules": dict},
    "weightquant": {"method": str, "modules": list}, "int8": {"method": str, "backend": str},
    "actgrid": {"modules": dict}, "share": {"modules": dict},
}
_REBUILD_ERRORS = (KeyError, TypeError, AttributeError, ValueError, IndexError, RuntimeError, NotImplementedError)
BITS_PER_PARAM_MIN = 1  # binary weights: the densest encoding zoo writes stores 1 bit per parameter
PARAMS_SLACK = 2**20  # parameters a file may describe beyond 8 per byte (tiny models, headers)


def params_budget(path: str | os.PathLike) -> int:
    """Most parameters a model rebuilt from this file may have: 8 per stored byte (1-bit weights), capped."""
    return min(MAX_PARAMS, os.path.getsize(path) * 8 // BITS_PER_PARAM_MIN + PARAMS_SLACK)


def check_steps(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The spec's compression steps, each a known kind with the keys its rebuild reads; ZooError otherwise."""
    out = []
    for i, step in enumerate(spec.get("compression") or []):
        kind = step.get("kind") if isinstance(step, dict) else None
        if not isinstance(kind, str) or kind not in STEP_CONTAINERS:
            raise ZooError(f"spec: compression step {i} {short_repr(step)} is not allowed; expected an object "
                           f"whose kind is one of {', '.join(STEP_CONTAINERS)}")
        for key, typ in STEP_CONTAINERS[kind].items():
            if not isinstance(step.get(key), typ):
                raise ZooError(f"spec: compression step {i} ({kind}) needs {key!r} as a {typ.__name__}, got "
                               f"{short_repr(step.get(key))}")
        attrs = step.get("attrs", {})
        if not isinstance(attrs, dict) or not all(isinstance(a, str) and not a.startswith("_") and isinstance(v, int)
                                                  and not isinstance(v, bool) and v >= 0 for a, v in attrs.items()):
            raise ZooError(f"spec: compression step {i} ({kind}): attrs={short_repr(attrs)} is not allowed; expected "
                           "an object of public attribute names -> ints >= 0")
        out.append(step)
    return out


def _apply_step(model: nn.Module, i: int, step: dict[str, Any]) -> nn.Module:
    """Recreate one recorded step's structure (in place, or a new graph for PT2E int8); a step that does
    not fit the model is a ZooError."""
    kind = step["kind"]
    try:
        if kind == "int8" and step["backend"] in pt2e.PT2E_BACKENDS:
            return pt2e.rebuild(model, step)
        if kind == "channels":
            rebuild_structure(model, step["modules"])
            for a, v in step.get("attrs", {}).items():
                if isinstance(getattr(model, a, None), bool) or not isinstance(getattr(model, a, None), int):
                    raise ZooError(f"spec: compression step {i} sets {short_repr(a)}, which is not an int "
                                   "attribute of the model")
                setattr(model, a, v)
        elif kind == "mask":
            register_masks(model, step["modules"])
        elif kind == "lowrank":
            lowrank_rebuild(model, step)
        elif kind == "actgrid":
            actgrid_rebuild(model, step)
        elif kind == "share":
            share_rebuild(model, step)
        else:
            quant_rebuild(model, step)
        return model
    except ZooError:
        raise
    except _REBUILD_ERRORS as e:
        raise ZooError(f"spec: compression step {i} ({kind}) does not fit {model_name(model)}: "
                       f"{type(e).__name__}: {clip(str(e), 160)}") from None


def build_from_spec(spec: dict[str, Any], max_params: int = MAX_PARAMS) -> nn.Module:
    """A model with the exact structure the spec describes (zoo.create, then each compression step).

    The layer shapes are first rebuilt on the meta device (no memory), and a structure with more than
    `max_params` parameters is refused before anything is allocated.
    """
    spec = check_spec(spec, "spec")
    steps_ = check_steps(spec)
    kwargs = spec.get("kwargs", {})
    shaped = meta_model(spec["name"], **kwargs)
    check_param_budget(shaped, MAX_PARAMS, f"spec {spec['name']}")
    for i, step in enumerate(steps_):
        if step["kind"] in ("channels", "lowrank"):  # the steps that create layers of recorded sizes
            with torch.device("meta"):
                _apply_step(shaped, i, step)
    check_param_budget(shaped, max_params, f"spec {spec['name']}")
    model = create(spec["name"], **kwargs)
    for i, step in enumerate(steps_):
        model = _apply_step(model, i, step)
    set_steps(model, steps_)
    install_decoder(model)
    return model
