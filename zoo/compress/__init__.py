"""zoo.compress: pruning, quantization and low-rank factorisation that really shrink the model.

Every technique works on every registered family through one API:

* `prune(model, amount, criterion, granularity, scope, data=None, example_inputs=None)`:
  `amount` a fraction or a per-layer mapping (layer path -> fraction); unstructured weight masks
  (`make_permanent` to bake them) or structured, physical channel removal;
  `snip` (pruning at initialisation), `cubic_schedule` / `prune_iterative` (gradual pruning).
* `quantize(model, method, calibration=None, ...)`: int8 'dynamic' / 'static' / 'qat' (then
  `convert`), STE 'binary' / 'ternary', and 'weights_kbit' (2..8 bits).
* `fix_activation_grids(model, {name: (scale, zero_point)})`: round layer outputs to fixed uint8 grids
  (a uint8 TFLite file's arithmetic, zoo.weights.tflite `activations="uint8"`).
* `low_rank(model, rank=None, energy=None)`: SVD for linear / 1x1 convs, Tucker-2 for kxk convs.
* `share_weights(model, bits)`: Deep Compression's weight sharing (Han et al. 2016): per-layer k-means with
  linear initialisation, bits per layer kind ({'conv': 8, 'fc': 5}) or path, trainable centroids.
* `save(model, path, format="safetensors"|"deep")` / `load(path)`: the checkpoint writer and loader of zoo.weights.checkpoint
  (safetensors + spec, rebuilt through the registry, then each compression step).
"""

from typing import Any

from zoo.compress.actgrid import fix_activation_grids
from zoo.compress.criteria import CRITERIA
from zoo.compress.lowrank import low_rank
from zoo.compress.pruning import (GRANULARITIES, SCOPES, channel_groups, cubic_schedule, make_permanent,
                                prunable_layers, prune, prune_iterative, snip, sparsity)
from zoo.compress.quantization import BACKENDS, METHODS, OBSERVERS, convert, quantize
from zoo.compress.serialize import build_from_spec
from zoo.compress.sharing import share_weights

__all__ = ["BACKENDS", "CRITERIA", "GRANULARITIES", "METHODS", "OBSERVERS", "SCOPES",  # the option vocabularies
           "build_from_spec", "channel_groups", "convert", "cubic_schedule", "fix_activation_grids", "load", "low_rank",
           "make_permanent", "prunable_layers", "prune", "prune_iterative", "quantize", "save", "share_weights", "snip",
           "sparsity"]


def __getattr__(name: str) -> Any:
    """`zoo.compress.save` / `load`: zoo.weights.checkpoint's save_checkpoint / load_checkpoint."""
    if name not in ("save", "load"):
        raise AttributeError(f"module 'zoo.compress' has no attribute {name!r}")
    # import inside a function: zoo.weights.checkpoint sits one layer above zoo.compress (it replays compression
    # steps), so a module-level import here would be a loop; these two names are only looked up after import.
    from zoo.weights import checkpoint

    return checkpoint.save_checkpoint if name == "save" else checkpoint.load_checkpoint
