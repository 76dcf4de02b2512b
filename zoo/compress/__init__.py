"""zoo.compress: pruning, quantization and low-rank factorisation that really shrink the model.

Every technique works on every registered family through one API:

* `prune(model, amount, criterion, granularity, scope, data=None, example_inputs=None)`:
  unstructured weight masks (`make_permanent` to bake them) or structured, physical channel removal;
  `snip` (pruning at initialisation), `cubic_schedule` / `prune_iterative` (gradual pruning).
* `quantize(model, method, calibration=None, ...)`: int8 'dynamic' / 'static' / 'qat' (then
  `convert`), STE 'binary' / 'ternary', and 'weights_kbit' (2..8 bits).
* `low_rank(model, rank=None, energy=None)`: SVD for linear / 1x1 convs, Tucker-2 for kxk convs.
* `save(model, path)` / `load(path)`: safetensors + spec, rebuilt through the registry.
"""

from zoo.compress.lowrank import low_rank
from zoo.compress.pruning import (channel_groups, cubic_schedule, make_permanent, prunable_layers, prune,
                                prune_iterative, snip, sparsity)
from zoo.compress.quantization import convert, quantize
from zoo.compress.serialize import build_from_spec, load, save

__all__ = ["build_from_spec", "channel_groups", "convert", "cubic_schedule", "load", "low_rank", "make_permanent",
           "prunable_layers", "prune", "prune_iterative", "quantize", "save", "snip", "sparsity"]
