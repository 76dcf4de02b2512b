"""Recipes: YAML files that chain training stages (train, knowledge distillation after Hinton et al.
2015, pruning, quantization, low-rank factorization and Deep Compression's weight sharing) over seeds, then report a table
(top-1, params, MACs, size, CPU latency) and a plot; `zoo recipe run/check/validate` drive them.

Layers (each module imports only those to its left):
`checks`, `columns`, `registry` (StageSpec, the typed StageContext, the stage-type registry) and `schema`
(validation, DAG order) <- the stage types `stages` (train, distill) and `compress_stages` (prune,
quantize, lowrank) and `share_stage` (share) <- `engine` (running stages, done-markers) <- `report` (results.json, markdown,
plot, `run_recipe`, `check_recipe`) <- `cli` (the `zoo recipe` subcommands). The built-in stage types
are registered here, so every import of zoo.recipe sees them.
"""

from zoo.recipe.checks import Checker
from zoo.recipe.cli import add_commands
from zoo.recipe.compress_stages import LOWRANK, PRUNE, QUANTIZE, check_finetune_defaults
from zoo.recipe.engine import load_checkpoint
from zoo.recipe.registry import (STAGE_TYPES, StageContext, StageSpec, StageType, register_defaults_section,
                                 register_stage_type)
from zoo.recipe.report import check_recipe, run_recipe
from zoo.recipe.schema import Recipe, RecipeError, load_recipe
from zoo.recipe.share_stage import SHARE
from zoo.recipe.stages import DISTILL, TRAIN, check_kd_defaults, check_train_defaults

for _stage_type in (TRAIN, DISTILL, PRUNE, QUANTIZE, LOWRANK, SHARE):
    register_stage_type(_stage_type)
register_defaults_section("train", check_train_defaults)
register_defaults_section("kd", check_kd_defaults)
register_defaults_section("finetune", check_finetune_defaults)

__all__ = [
    "STAGE_TYPES", "Checker", "Recipe", "RecipeError", "StageContext", "StageSpec", "StageType", "add_commands",
    "check_recipe", "load_checkpoint", "load_recipe", "register_defaults_section", "register_stage_type",
    "run_recipe",
]
