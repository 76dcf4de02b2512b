"""The `share` recipe stage: Deep Compression's trained quantization and its file (Han, Mao & Dally 2016,
"Deep Compression: Compressing Deep Neural Networks with Pruning, Trained Quantization and Huffman Coding").

It shares the weights of the `from` model (zoo.compress.share_weights: per-layer k-means, linear
initialisation, bits per layer kind or path), fine-tunes the centroids (optional `finetune:` block), and
writes the Deep Compression file `model.deep.safetensors` next to the stage's checkpoint
(zoo.weights.save_checkpoint format="deep"). The model is then read back from that file through the one
checkpoint loader, checked to equal the saved one bit for bit, timed (decode time) and evaluated: the
stage's metrics are those of the decoded file. `file_fields` gives the report the real file sizes
(os.path.getsize) and the share of the file taken by indices, codebooks and values.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from zoo.compress import share_weights
from zoo.compress.deepfile import breakdown, records, sections
from zoo.compress.sharing import LAYER_KINDS, MAX_BITS, MIN_BITS
from zoo.errors import ZooError
from zoo.recipe.checks import Checker
from zoo.recipe.compress_stages import FINETUNE_DOC, _evaluate, _finetune, _finetune_run, _metrics
from zoo.recipe.registry import StageContext, StageType
from zoo.weights.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, state_tensors

DEEP_FILE = "model.deep.safetensors"
DENSE_FILE = "model.safetensors"
DECODE_REPEATS = 5  # loads of the deep file; the decode time is their median
SHARE_KEYS = {
    "bits": f"bits per shared weight, an int in {MIN_BITS}..{MAX_BITS} for every conv/linear layer, or a mapping of "
            f"layer kinds ({', '.join(LAYER_KINDS)}) and/or layer paths to such ints (unnamed layers stay unshared)",
    "finetune": FINETUNE_DOC + " (the centroids are trained: gradients summed per cluster, pruned weights stay zero)",
}


def _bits(chk: Checker, path: str, v: Any) -> int:
    b = chk.typed(v, path, "int")
    if not MIN_BITS <= b <= MAX_BITS:
        raise chk.fail(path, f"{b} is not allowed; expected an int in {MIN_BITS}..{MAX_BITS}")
    return b


def _validate_share(chk: Checker, path: str, stage: dict, defaults: dict) -> dict[str, Any]:
    if "bits" not in stage:
        raise chk.fail(f"{path}.bits", "missing required key (" + SHARE_KEYS["bits"] + ")")
    raw = stage["bits"]
    if isinstance(raw, dict):
        m = chk.mapping(raw, f"{path}.bits")
        if not m:
            raise chk.fail(f"{path}.bits", "an empty mapping; give layer kind or path -> bits pairs")
        bits: int | dict[str, int] = {k: _bits(chk, f"{path}.bits.{k}", v) for k, v in m.items()}
    else:
        bits = _bits(chk, f"{path}.bits", raw)
    out: dict[str, Any] = {"bits": bits}
    ft = _finetune(chk, path, stage, defaults)
    if ft is not None:
        out["train"] = ft
    return out


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    """True if both models store the same tensors, bit for bit (same keys, dtypes, shapes and bytes)."""
    sa, sb = state_tensors(a), state_tensors(b)
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape
        and torch.equal(sa[k].reshape(-1).view(torch.uint8), sb[k].reshape(-1).view(torch.uint8)) for k in sa)


def write_deep(ctx: StageContext, model: nn.Module, path: Path) -> tuple[nn.Module, float]:
    """Save the Deep Compression file, load it back (timed, median of DECODE_REPEATS) and check it bit for bit."""
    meta = ctx.meta
    save_checkpoint(model, path, classes=meta.get("classes"), mean=meta.get("mean"), std=meta.get("std"),
                    format="deep")
    times, loaded = [], model
    for _ in range(DECODE_REPEATS):
        t0 = time.perf_counter()
        loaded = load_checkpoint(path)
        times.append(time.perf_counter() - t0)
    if not _same_state(model, loaded):
        raise ZooError(f"share: {path} does not decode to the weights that were saved")
    return loaded, 1000 * statistics.median(times)


def run_share(ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    """Share the `from` model's weights, fine-tune the centroids, write and re-read the Deep Compression file."""
    o = ctx.options
    model = share_weights(ctx.initial_model().cpu(), o["bits"])
    before, ft_epochs = None, 0
    if "train" in o:
        before = _evaluate(ctx, model)
        ft_epochs = _finetune_run(ctx, model, "finetune")["epochs"]
    model = model.cpu()
    decode_ms = None
    if ctx.dir is not None:
        model, decode_ms = write_deep(ctx, model, ctx.dir / DEEP_FILE)
    metrics = _metrics(ctx, model, before, ft_epochs)
    if decode_ms is not None:
        metrics["decode_ms"] = decode_ms
    return model, metrics


def file_fields(stage_dir: Path, root_dir: Path, decode_ms: float | None) -> dict[str, Any]:
    """Real file sizes of a stage: its deep file (else its checkpoint), the dense root's checkpoint, their ratio
    (os.path.getsize of both), and for a deep file the bytes of indices, codebooks, values and the rest."""
    deep = stage_dir / DEEP_FILE
    f = deep if deep.is_file() else stage_dir / DENSE_FILE
    dense = root_dir / DENSE_FILE
    if not f.is_file() or not dense.is_file():
        return {}
    size, dense_size = os.path.getsize(f), os.path.getsize(dense)
    out: dict[str, Any] = {"file": f.name, "file_bytes": size, "dense_file_bytes": dense_size,
                           "file_ratio": dense_size / size}
    if f == deep:
        layout = read_checkpoint(f).metadata["deep"]
        parts = breakdown(layout)
        out["file_parts"] = {**parts, "header": size - sum(parts.values())}
        out["file_layers"] = [_layer(rec) for rec in records(layout, str(f)) if "layer" in rec]
        out["decode_ms"] = decode_ms
    return out


def _layer(rec: dict[str, Any]) -> dict[str, Any]:
    """One shared layer of a deep file as in Han et al. 2016, Tables 2-3: weights kept, bits per kept weight."""
    n, kept = 1, rec["kept"]
    for d in rec["shape"]:
        n *= d
    sec = sections(rec)
    return {"layer": rec["layer"], "weights": n, "kept": kept, "bits": rec["bits"], "index_bits": rec["index_bits"],
            "entries": rec["entries"], "value_bits_huffman": 8 * sec["values"] / max(kept, 1),
            "index_bits_huffman": 8 * sec["index"] / max(kept, 1), "bytes": sum(sec.values())}


def layer_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: the per-layer table (Han et al. 2016, Tables 2-3) of every row with a deep file."""
    rows = [r for r in rows if r.get("file_layers")]
    if not rows:
        return []
    out = ["Per layer, as in Han et al. 2016 Tables 2-3 (bits per kept weight; the relative indices' Huffman bits "
           "include the filler entries; rate: the layer's fp32 bytes / its bytes in the file):", "",
           "| row | layer | weights | kept (%) | weight bits | weight bits, Huffman | index bits | index bits, Huffman "
           "| rate |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for x in r["file_layers"]:
            out.append(f"| {r['stage']} | {x['layer']} | {x['weights']:,} | {100 * x['kept'] / x['weights']:.1f} | "
                       f"{x['bits']} | {x['value_bits_huffman']:.2f} | {x['index_bits']} | "
                       f"{x['index_bits_huffman']:.2f} | {4 * x['weights'] / x['bytes']:.1f}x |")
    return out + [""]


SHARE = StageType(name="share", keys=SHARE_KEYS, validate=_validate_share, runner=run_share, needs_model=False,
                  doc="weight sharing (zoo.compress.share_weights) with centroid fine-tuning, then the Deep "
                      "Compression file (model.deep.safetensors)")
