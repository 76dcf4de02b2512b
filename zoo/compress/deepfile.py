"""The Deep Compression file codec: Han, Mao & Dally 2016, "Deep Compression: Compressing Deep Neural Networks
with Pruning, Trained Quantization and Huffman Coding" (ICLR), sections 2 and 4.

zoo.weights.checkpoint writes it for `save_checkpoint(model, path, format="deep")` and reads it through the
one checkpoint loader. The file is a safetensors file (no pickle) holding one uint8 tensor, `zoo.deep`, the
payload; its header holds `zoo.spec` (name, kwargs, compression steps), `zoo.deep` (the layout below) and
`zoo.sha256`, the sha256 of the canonical JSON of every other zoo.* header entry followed by the payload.

Each weight shared by zoo.compress.sharing (`centroids[index] * keep`) is one record of the layout, the
list `[layer, shape, bits, index_bits, kept, entries, value stream bytes, index stream bytes, centroids]`
(`SHARED_FIELDS`), whose payload sections are, in order: the float32 centroids (all 2^bits, or, when every
unused one is exactly 0, only those of the clusters that have a code); the code lengths (4 bits each) of the
cluster-index Huffman code (2^bits symbols) and of the index-difference code (2^index_bits symbols); the
Huffman stream of the cluster index of every kept weight; the Huffman stream of the relative indices.
A kept weight at flat position p after the previous one at q (q = -1 at the start) is the symbol
p - q - 1 when that is below F = 2^index_bits - 1; a longer gap first takes filler entries, the symbol F,
each advancing F positions with no value (the paper's filler zeros: their value is implicitly zero and not
stored). index_bits is 8 for conv and 5 for fc weights (the paper's choice). Every other state tensor is a
record `[key, dtype, shape]` (`RAW_FIELDS`) whose raw little-endian bytes follow in the payload.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from zoo._registry import MAX_PARAMS
from zoo.compress import huffman
from zoo.compress.serialize import PARAMS_SLACK, pack_bits
from zoo.compress.sharing import MAX_BITS, MIN_BITS, shared_layers
from zoo.errors import ZooError
from zoo.untrusted import short_repr

VERSION = 1
PAYLOAD = "zoo.deep"  # the safetensors tensor holding the payload
INDEX_BITS = {4: 8, 2: 5}  # weight rank -> bits of a relative index: conv 8, fc 5 (Han et al. 2016, section 2)
DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
          "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
          "BOOL": torch.bool}
_NAMES = {v: k for k, v in DTYPES.items()}
SHARED_FIELDS = ("layer", "shape", "bits", "index_bits", "kept", "entries", "value_bytes", "index_bytes", "centroids")
RAW_FIELDS = ("key", "dtype", "shape")


def canonical(obj: Any) -> bytes:
    """Compact, key-sorted JSON bytes: what the checksum covers for header entries."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def checksum(header: dict[str, Any], payload: bytes) -> str:
    """sha256 hex of the header entries (parsed zoo.* values without sha256) and then the payload."""
    return hashlib.sha256(canonical(header) + b"\0" + payload).hexdigest()


def params_budget(path: str | os.PathLike) -> int:
    """Most parameters a deep file may describe: each payload bit is at most one entry of at most 255 positions."""
    return min(MAX_PARAMS, os.path.getsize(path) * 8 * 255 + PARAMS_SLACK)


def _prefix(layer: str) -> str:
    return f"{layer}.parametrizations.weight." if layer else "parametrizations.weight."


def shared_keys(layer: str) -> tuple[str, str, str, str]:
    """State keys of a shared layer: centroids, cluster index, packed keep mask and its shape."""
    p = _prefix(layer)
    return p + "original", p + "0.idx", p + "0.mask#bits", p + "0.mask#shape"


def relative_indices(positions: np.ndarray, index_bits: int) -> np.ndarray:
    """Index-difference symbols (filler symbol F = 2^index_bits - 1 where a gap exceeds F) of sorted positions."""
    f = (1 << index_bits) - 1
    gaps = np.diff(np.concatenate([[-1], positions.astype(np.int64)]))
    fillers = (gaps - 1) // f  # fillers before each kept weight
    out = np.full(int(fillers.sum()) + gaps.size, f, dtype=np.int64)
    ends = np.cumsum(fillers + 1) - 1  # where each real symbol lands
    out[ends] = gaps - 1 - fillers * f
    return out


def positions_of(symbols: np.ndarray, index_bits: int) -> np.ndarray:
    """Flat positions of the kept weights encoded by `relative_indices` symbols."""
    f = (1 << index_bits) - 1
    real = symbols < f
    advance = np.where(real, symbols + 1, f)
    return (np.cumsum(advance) - 1)[real]


def _shared_record(layer: str, m: nn.Module, p: nn.Module, parts: list[bytes]) -> list[Any]:
    """Encode one shared layer into payload parts; its layout record."""
    keep = p.mask.detach().cpu().reshape(-1).numpy()
    positions = np.flatnonzero(keep)
    values = p.idx.detach().cpu().reshape(-1).numpy().astype(np.int64)[positions]
    ib = INDEX_BITS.get(p.mask.dim(), 8)
    k = 2 ** p.bits
    symbols = relative_indices(positions, ib)
    vlen = huffman.code_lengths(np.bincount(values, minlength=k))
    ilen = huffman.code_lengths(np.bincount(symbols, minlength=2 ** ib))
    vstream, istream = huffman.encode(values, vlen), huffman.encode(symbols, ilen)
    original = m.parametrizations.weight.original
    if original.dtype != torch.float32:
        raise ZooError(f"save (format='deep'): the centroids of layer {layer!r} are {original.dtype}; the deep format "
                       "stores float32 centroids (convert the model with .float() first)")
    cent = original.detach().cpu().contiguous().numpy().astype("<f4")
    used = vlen > 0
    if not cent.view("<i4")[~used].any():  # unused centroids all +0.0: store those of the coded clusters only
        cent = cent[used]
    parts += [cent.tobytes(), huffman.pack_lengths(vlen), huffman.pack_lengths(ilen), vstream, istream]
    return [layer, list(p.mask.shape), p.bits, ib, int(positions.size), int(symbols.size), len(vstream),
            len(istream), int(cent.size)]


def encode(model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[bytes, dict[str, Any]]:
    """(payload, layout) of a model's checkpoint tensors, its shared layers sparse and Huffman-coded."""
    shared = {_prefix(n) + "original": (n, m, p) for n, m, p in shared_layers(model)}
    skip = {k for n, _, _ in shared.values() for k in shared_keys(n)}
    parts: list[bytes] = []
    recs: list[list[Any]] = []
    for key, t in tensors.items():
        if key in shared:
            recs.append(_shared_record(*shared[key], parts))
        elif key not in skip:
            t = t.detach().cpu().contiguous()
            if t.dtype not in _NAMES:
                raise ZooError(f"save (format='deep'): tensor {key!r} has dtype {t.dtype}, which the deep format "
                               f"does not store; allowed: {', '.join(str(d) for d in DTYPES.values())}")
            parts.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            recs.append([key, _NAMES[t.dtype], list(t.shape)])
    return b"".join(parts), {"version": VERSION, "records": recs}


def _lengths_bytes(bits: int) -> int:
    return (2 ** bits + 1) // 2


def sections(rec: dict[str, Any]) -> dict[str, int]:
    """Payload bytes of one record by kind: codebook (centroids and code lengths), values, index, other."""
    if "layer" in rec:
        cb = 4 * rec["centroids"] + _lengths_bytes(rec["bits"]) + _lengths_bytes(rec["index_bits"])
        return {"codebook": cb, "values": rec["value_bytes"], "index": rec["index_bytes"], "other": 0}
    n = math.prod(rec["shape"]) * torch.empty(0, dtype=DTYPES[rec["dtype"]]).element_size()
    return {"codebook": 0, "values": 0, "index": 0, "other": n}


def _int(v: Any, lo: int, hi: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def _check_record(rec: Any, i: int, where: str) -> dict[str, Any]:
    """One layout record (a list) as a dict of its fields; ZooError naming the header if it is malformed."""
    bad = f"{where}: deep-compression header, record {i} {short_repr(rec)} is not allowed; expected "
    if isinstance(rec, list) and len(rec) == len(SHARED_FIELDS):
        r = dict(zip(SHARED_FIELDS, rec))
        ok = (isinstance(r["layer"], str) and _int(r["bits"], MIN_BITS, MAX_BITS) and _int(r["index_bits"], 1, 8)
              and isinstance(r["shape"], list) and all(_int(d, 0) for d in r["shape"])
              and all(_int(r[k], 0) for k in ("kept", "entries", "value_bytes", "index_bytes", "centroids")))
        if not ok:
            raise ZooError(bad + f"a shared layer [{', '.join(SHARED_FIELDS)}] (bits and index_bits in "
                                 f"{MIN_BITS}..{MAX_BITS}, sizes ints >= 0)")
        n = math.prod(r["shape"])
        if r["kept"] > n or not r["kept"] <= r["entries"] <= n or r["centroids"] > 2 ** r["bits"]:
            raise ZooError(f"{where}: deep-compression header, layer {r['layer']!r}: {r['kept']} kept weights in "
                           f"{r['entries']} entries, {r['centroids']} centroids do not fit its {n} weights and "
                           f"{2 ** r['bits']} clusters")
        return r
    r = dict(zip(RAW_FIELDS, rec)) if isinstance(rec, list) and len(rec) == len(RAW_FIELDS) else {}
    ok = (bool(r) and isinstance(r["key"], str) and isinstance(r["dtype"], str) and r["dtype"] in DTYPES
          and isinstance(r["shape"], list) and all(_int(d, 0) for d in r["shape"]))
    if not ok:
        raise ZooError(bad + f"a tensor [{', '.join(RAW_FIELDS)}] (dtype one of {', '.join(DTYPES)}) or a shared "
                             f"layer [{', '.join(SHARED_FIELDS)}]")
    return r


def records(layout: Any, where: str) -> list[dict[str, Any]]:
    """The checked records of a layout, each as a dict of its fields (shared layers have a "layer")."""
    if not (isinstance(layout, dict) and layout.get("version") == VERSION and isinstance(layout.get("records"), list)):
        raise ZooError(f"{where}: deep-compression header {short_repr(layout)} is not allowed; expected an object "
                       f"with version {VERSION} and a list of records")
    return [_check_record(rec, i, where) for i, rec in enumerate(layout["records"])]


def layout_shapes(layout: Any, payload_shape: tuple[int, ...] | None, where: str) -> dict[str, tuple[int, ...]]:
    """The state-tensor shapes a checked layout decodes to; ZooError naming the header if it is malformed."""
    shapes: dict[str, tuple[int, ...]] = {}
    total = 0
    for rec in records(layout, where):
        total += sum(sections(rec).values())
        if "layer" in rec:
            c, x, mb, ms = shared_keys(rec["layer"])
            n = math.prod(rec["shape"])
            new = {c: (2 ** rec["bits"],), x: tuple(rec["shape"]), mb: ((n + 7) // 8,), ms: (len(rec["shape"]),)}
        else:
            new = {rec["key"]: tuple(rec["shape"])}
        if set(new) & set(shapes):
            raise ZooError(f"{where}: deep-compression header names tensor {sorted(set(new) & set(shapes))[0]!r} twice")
        shapes.update(new)
    if payload_shape != (total,):
        raise ZooError(f"{where}: deep-compression header describes {total:,} payload bytes but the file's "
                       f"{PAYLOAD!r} tensor has shape {short_repr(payload_shape)}; the file is truncated or corrupt")
    return shapes


def _decode_shared(rec: dict[str, Any], buf: memoryview, where: str) -> dict[str, torch.Tensor]:
    """The four state tensors of one shared layer from its payload bytes."""
    k, ib, layer = 2 ** rec["bits"], rec["index_bits"], rec["layer"]
    o = 4 * rec["centroids"]
    stored = np.frombuffer(buf[:o], dtype="<f4").astype(np.float32)
    vlen = huffman.unpack_lengths(bytes(buf[o: o + _lengths_bytes(rec["bits"])]), k)
    o += _lengths_bytes(rec["bits"])
    ilen = huffman.unpack_lengths(bytes(buf[o: o + _lengths_bytes(ib)]), 2 ** ib)
    o += _lengths_bytes(ib)
    huffman.check_lengths(vlen, rec["kept"], f"{where}: codebook of the cluster indices of layer {layer!r}")
    huffman.check_lengths(ilen, rec["entries"], f"{where}: codebook of the relative indices of layer {layer!r}")
    cent = stored
    if rec["centroids"] != k:  # only the centroids of the coded clusters are stored; the others are 0
        if rec["centroids"] != int((vlen > 0).sum()):
            raise ZooError(f"{where}: codebook of the cluster indices of layer {layer!r}: {rec['centroids']} centroids "
                           f"stored for {int((vlen > 0).sum())} coded clusters")
        cent = np.zeros(k, dtype=np.float32)
        cent[vlen > 0] = stored
    nv, ni = rec["value_bytes"], rec["index_bytes"]
    what = f"{where}: Huffman stream of the {{}} of layer {layer!r}"
    values = huffman.decode(bytes(buf[o: o + nv]), vlen, rec["kept"], what.format("cluster indices"))
    symbols = huffman.decode(bytes(buf[o + nv: o + nv + ni]), ilen, rec["entries"], what.format("relative indices"))
    pos = positions_of(symbols, ib)
    n = math.prod(rec["shape"])
    if pos.size != rec["kept"] or (pos.size and int(pos[-1]) >= n):
        raise ZooError(what.format("relative indices") + f": it decodes to {pos.size} weights up to position "
                       f"{int(pos[-1]) if pos.size else -1}; the header says {rec['kept']} of {n}")
    idx = np.zeros(n, dtype=np.uint8)
    idx[pos] = values
    keep = np.zeros(n, dtype=np.uint8)
    keep[pos] = 1
    c, x, mb, ms = shared_keys(layer)
    return {c: torch.from_numpy(cent), x: torch.from_numpy(idx).reshape(rec["shape"]),
            mb: pack_bits(torch.from_numpy(keep), 1), ms: torch.tensor(rec["shape"], dtype=torch.int64)}


def decode(layout: dict[str, Any], payload: bytes, where: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a layout checked by `layout_shapes` and its verified payload."""
    buf = memoryview(payload)
    out: dict[str, torch.Tensor] = {}
    o = 0
    for rec in records(layout, where):
        n = sum(sections(rec).values())
        if "layer" in rec:
            out.update(_decode_shared(rec, buf[o: o + n], where))
        else:
            raw = torch.frombuffer(bytearray(buf[o: o + n]), dtype=torch.uint8) if n else torch.zeros(0,
                                                                                                  dtype=torch.uint8)
            out[rec["key"]] = raw.view(DTYPES[rec["dtype"]]).reshape(rec["shape"]).clone()
        o += n
    return out


def breakdown(layout: dict[str, Any], where: str = "deep file") -> dict[str, int]:
    """Payload bytes by kind over all records: codebook, values (cluster indices), index, other tensors."""
    out = {"codebook": 0, "values": 0, "index": 0, "other": 0}
    for rec in records(layout, where):
        for k, v in sections(rec).items():
            out[k] += v
    return out
