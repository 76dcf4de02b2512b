"""Recipes: YAML files that chain training stages (train, knowledge distillation after Hinton et al.
2015, pruning, quantization and low-rank factorization) over seeds, then report a table
(top-1, params, MACs, size, CPU latency) and a plot; `zoo recipe run/check/validate` drive them.

Layout: `schema` (validation, stage-type registry, DAG order), `stages` (train, distill runners),
`compress_stages` (prune, quantize, lowrank runners),
`engine` (running, done-markers, check), `report` (results.json, markdown, plot, comparison),
`cli` (the `zoo recipe` subcommands).
"""

from zoo.recipe.cli import add_commands
from zoo.recipe.engine import check_recipe, load_checkpoint, run_recipe
from zoo.recipe.schema import (
    STAGE_TYPES,
    Recipe,
    RecipeError,
    StageSpec,
    StageType,
    load_recipe,
    register_stage_type,
)

__all__ = [
    "STAGE_TYPES", "Recipe", "RecipeError", "StageSpec", "StageType", "add_commands", "check_recipe",
    "load_checkpoint", "load_recipe", "register_stage_type", "run_recipe",
]
