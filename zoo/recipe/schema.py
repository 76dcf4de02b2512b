"""Recipe files: YAML schema, validation before anything runs, and stage ordering (a DAG).

A recipe names a dataset, one seed or a list of seeds, and named stages (`train`, `distill`, and
further types registered with `register_stage_type`). Stages refer to each other through `from:`
(take the model of another stage) and through type-specific reference keys (`teacher:`). Every
error names the file, the key path (e.g. `stages.kd_w05.teacher`) and what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zoo.data import IMAGENET_MEAN, IMAGENET_STD
from zoo.data.sources import data_root
from zoo.errors import ZooError
from zoo.recipe.checks import (  # RecipeError, Checker and DATASETS are part of this module's API too
    DATASETS, Checker, RecipeError, check_model_kwargs, check_train_config, short_value,
    type_name,
)
from zoo.recipe.columns import COLUMNS, DEFAULT_COLUMNS
from zoo.recipe.registry import COMMON_STAGE_KEYS, DEFAULT_SECTIONS, STAGE_TYPES, StageSpec
from zoo.train import TrainConfig
from zoo.untrusted import check_flow_depth, check_tree, clip, read_text

DATA_PREFIX = "$ZOO_DATA/"  # recipe paths starting with this are under zoo.data.sources.data_root()
STAGE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
# file suffixes a file-reference key accepts (default: .safetensors); `init` also takes TFLite files
FILE_REF_SUFFIXES: dict[str, tuple[str, ...]] = {"init": (".safetensors", ".tflite")}


# --------------------------------------------------------------------------- recipe data


@dataclass
class RowSpec:
    """One row of the report table: a stage, its label and an optional published reference."""

    stage: str
    label: str
    reference: dict[str, Any]


@dataclass
class Recipe:
    """A validated recipe; `stages` are in dependency (topological) order."""

    path: Path
    name: str
    description: str
    dataset: dict[str, Any]
    seeds: list[int]
    stages: dict[str, StageSpec]
    rows: list[RowSpec]
    columns: list[str]
    tolerance: dict[str, float]
    latency: dict[str, int]
    quick: dict[str, Any]
    raw: dict[str, Any]

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(C, H, W) fed to every model."""
        return tuple(self.dataset["input_size"])  # type: ignore[return-value]


TOP_KEYS = {
    "name": "recipe name (default: file stem); the default output folder is runs/<name>",
    "description": "free text",
    "dataset": "mapping: name, input_size, root, val_fraction, num_workers",
    "seed": "one int seed (or use `seeds`)",
    "seeds": "list of int seeds; top-1 is reported as mean ± std over them",
    "defaults": "mapping of per-type defaults, e.g. {train: {...}, kd: {...}}",
    "stages": "mapping of stage name -> stage",
    "table": "mapping: rows (list of stage names or {stage, label, reference}), columns (list)",
    "tolerance": "mapping for `zoo recipe check`: top1 (points), params, macs, size_kb",
    "latency": "mapping: threads (torch threads for the latency column), batch_size",
    "quick": "mapping for --quick: seeds (list), train (overrides, default {epochs: 1}), finetune (overrides of "
             "fine-tune blocks, default: train's)",
}
DATASET_KEYS = {
    "name": "one of " + ", ".join(DATASETS),
    "input_size": "[C, H, W] fed to the models",
    "root": "data folder (relative paths are relative to the recipe file; $ZOO_DATA/... is under the data root)",
    "val_fraction": "held-out fraction in (0, 1)",
    "num_workers": "DataLoader workers",
    "normalize": "'dataset' (the training split's mean/std, default), 'imagenet' (torchvision's ImageNet "
                 "mean/std, for models pretrained with it) or {mean: [...], std: [...]}",
}
ROW_KEYS = {"stage": "stage name", "label": "row label (default: model and kwargs)",
            "reference": "published numbers: {top1, errors_per_10k, source}; null values mean absent"}
REFERENCE_KEYS = {"top1": "published top-1 (%) or null",
                  "base_top1": "published top-1 (%) of the model it was compressed from (gives the published change)",
                  "errors_per_10k": "published test errors per 10,000",
                  "params": "published (nonzero) weight count or null", "source": "citation for the numbers"}
TOLERANCE_KEYS = {"top1": "max |diff| of top-1 in points", "params": "max |diff| of parameter counts",
                  "macs": "max |diff| of MACs", "size_kb": "max |diff| of serialized size in KB"}
LATENCY_KEYS = {"threads": "torch threads while timing (int >= 1)", "batch_size": "batch size (int >= 1)"}
QUICK_KEYS = {"seeds": "seeds used with --quick (default: the first seed)",
              "train": "train-config overrides used with --quick (default {epochs: 1})",
              "finetune": "train-config overrides of the `finetune:` blocks of prune / quantize / lowrank stages "
                          "used with --quick, instead of `train` (default: the `train` overrides)"}


def load_yaml(path: Path) -> Any:
    """yaml.safe_load of a file, rejecting duplicate keys (never executes anything)."""

    class _Loader(yaml.SafeLoader):
        pass

    def _mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise RecipeError(f"{path}: line {key_node.start_mark.line + 1}: duplicate key {short_value(key)}")
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
    try:
        text = check_flow_depth(read_text(path, "recipe"), str(path))  # before PyYAML recurses into it
    except ZooError as e:
        raise RecipeError(str(e)) from None
    try:  # deep nesting overflows the parser's stack; ints over Python's digit limit raise ValueError
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {clip(str(e), 300)}") from None
    except RecipeError:
        raise
    except (RecursionError, ValueError) as e:
        raise RecipeError(f"{path}: not a usable YAML document ({type(e).__name__}: {clip(str(e))})") from None
    try:
        return check_tree(raw, str(path))  # alias bombs and deep nesting, before anything walks the value
    except ZooError as e:
        raise RecipeError(str(e)) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and fully validate a recipe file (no training, no data loading)."""
    path = Path(path)
    return validate_recipe(load_yaml(path), path)


def validate_recipe(raw: Any, path: Path) -> Recipe:
    """Validate a parsed recipe mapping; `path` is used in messages and for relative paths."""
    chk = Checker(str(path))
    if raw is None:
        raise chk.fail("", "the recipe is empty")
    chk.mapping(raw, "", TOP_KEYS, required=("dataset", "stages"))
    name = chk.typed(raw.get("name", path.stem.split(".")[0]), "name", "str")
    if not STAGE_NAME.match(name):
        raise chk.fail("name", f"{short_value(name)} is not allowed; use letters, digits, '_' and '-'")
    description = chk.typed(raw.get("description", ""), "description", "str")
    dataset = _dataset(chk, raw["dataset"], path)
    seeds = _seeds(chk, raw)
    defaults = chk.mapping(raw.get("defaults", {}) or {}, "defaults")
    stages_raw = chk.mapping(raw["stages"], "stages")
    if not stages_raw:
        raise chk.fail("stages", "at least one stage is required")
    for k, v in defaults.items():
        if k not in DEFAULT_SECTIONS:
            raise chk.fail(f"defaults.{k}", "unknown key; allowed: " + ", ".join(DEFAULT_SECTIONS))
        DEFAULT_SECTIONS[k](chk, f"defaults.{k}", v or {})
    stages = _stages(chk, stages_raw, defaults, dataset, path)
    rows, columns = _table(chk, raw.get("table"), stages)
    tolerance = {k: chk.typed(v, f"tolerance.{k}", "float")
                 for k, v in chk.mapping(raw.get("tolerance", {}) or {}, "tolerance", TOLERANCE_KEYS).items()}
    for k, v in tolerance.items():
        if v < 0:
            raise chk.fail(f"tolerance.{k}", f"{v:g} is not allowed; expected a number >= 0")
    latency = {"threads": 1, "batch_size": 1}
    for k, v in chk.mapping(raw.get("latency", {}) or {}, "latency", LATENCY_KEYS).items():
        latency[k] = _positive_int(chk, v, f"latency.{k}")
    quick = _quick(chk, raw.get("quick", {}) or {}, seeds)
    _check_quick_merges(chk, quick, stages)
    return Recipe(path=path, name=name, description=description, dataset=dataset, seeds=seeds,
                  stages=stages, rows=rows, columns=columns, tolerance=tolerance, latency=latency,
                  quick=quick, raw=raw)


def _positive_int(chk: Checker, v: Any, path: str) -> int:
    chk.typed(v, path, "int")
    if v < 1:
        raise chk.fail(path, f"{v} is not allowed; expected an int >= 1")
    return v


def recipe_path(value: str, recipe: Path) -> Path:
    """A path written in a recipe: `$ZOO_DATA/...` is under zoo's data root ($ZOO_DATA, see
    zoo.data.sources.data_root), `~` is expanded, and other relative paths are relative to the recipe file."""
    if value.startswith(DATA_PREFIX):
        return data_root() / value[len(DATA_PREFIX):]
    p = Path(value).expanduser()
    return p if p.is_absolute() else recipe.parent / p


def _normalize(chk: Checker, v: Any, channels: int) -> Any:
    """'dataset', or {mean, std} lists (one finite number per channel, std > 0); 'imagenet' expands."""
    if v == "imagenet":
        v = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    if v == "dataset":
        return v
    if not isinstance(v, dict) or set(v) != {"mean", "std"}:
        raise chk.fail("dataset.normalize", "expected 'dataset', 'imagenet' or a mapping {mean: [...], std: [...]}")
    for key in ("mean", "std"):
        vals = chk.typed(v[key], f"dataset.normalize.{key}", "float_list")
        if len(vals) != channels or (key == "std" and min(vals) <= 0):
            raise chk.fail(f"dataset.normalize.{key}", f"expected {channels} numbers" + (" > 0" if key == "std" else ""))
    return {"mean": [float(x) for x in v["mean"]], "std": [float(x) for x in v["std"]]}


def _dataset(chk: Checker, d: Any, path: Path) -> dict[str, Any]:
    chk.mapping(d, "dataset", DATASET_KEYS, required=("name", "input_size"))
    name = chk.typed(d["name"], "dataset.name", "str")
    if name not in DATASETS:
        raise chk.fail("dataset.name", f"{short_value(name)} is not supported; allowed: " + ", ".join(DATASETS))
    size = chk.typed(d["input_size"], "dataset.input_size", "int_list")
    if len(size) != 3 or min(size) < 1:
        raise chk.fail("dataset.input_size", f"{short_value(size)} is not allowed; expected [C, H, W] of positive ints")
    if size[0] not in (1, 3):
        raise chk.fail("dataset.input_size", f"{short_value(size)} has {size[0]} channels; the datasets deliver 1 or 3")
    out: dict[str, Any] = {"name": name, "input_size": list(size), "root": None, "val_fraction": 0.2,
                           "num_workers": 0, "normalize": _normalize(chk, d.get("normalize", "dataset"), size[0])}
    if d.get("root") is not None:
        out["root"] = str(recipe_path(chk.typed(d["root"], "dataset.root", "str"), path))
    if "val_fraction" in d:
        vf = chk.typed(d["val_fraction"], "dataset.val_fraction", "float")
        if not 0 < vf < 1:
            raise chk.fail("dataset.val_fraction", f"{vf:g} is not allowed; expected a number in (0, 1)")
        out["val_fraction"] = vf
    if "num_workers" in d:
        nw = chk.typed(d["num_workers"], "dataset.num_workers", "int")
        if nw < 0:
            raise chk.fail("dataset.num_workers", f"{nw} is not allowed; expected an int >= 0")
        out["num_workers"] = nw
    return out


def _seed_value(chk: Checker, v: Any, path: str) -> int:
    chk.typed(v, path, "int")
    if v < 0:
        raise chk.fail(path, f"{v} is not allowed; expected an int >= 0")
    return v


def _seeds(chk: Checker, raw: dict) -> list[int]:
    if "seed" in raw and "seeds" in raw:
        raise chk.fail("seeds", "give either `seed` or `seeds`, not both")
    if "seeds" in raw:
        seeds = chk.typed(raw["seeds"], "seeds", "int_list")
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise chk.fail("seeds", f"{short_value(seeds)} is not allowed; expected a non-empty list of distinct ints >= 0")
        return list(seeds)
    return [_seed_value(chk, raw.get("seed", 0), "seed")]


def _stages(chk: Checker, stages_raw: dict, defaults: dict, dataset: dict, path: Path) -> dict[str, StageSpec]:
    parsed: dict[str, dict] = {}
    for name, st in stages_raw.items():
        p = f"stages.{name}"
        typ, options = _check_stage(chk, p, name, st, defaults)
        stype = STAGE_TYPES[typ]
        refs: list[str] = []
        files: dict[str, Path] = {}
        if "from" in st:
            refs.append(_ref(chk, f"{p}.from", st["from"], stages_raw, name))
        for key in stype.ref_keys:
            if key not in st:
                continue
            v = chk.typed(st[key], f"{p}.{key}", "str")
            suffixes = FILE_REF_SUFFIXES.get(key, (".safetensors",))
            if key in stype.file_refs and v not in stages_raw and v.endswith(suffixes):
                f = recipe_path(v, path)
                if not f.is_file():
                    raise chk.fail(f"{p}.{key}", f"weights file {str(f)!r} does not exist")
                files[key] = f
            else:
                refs.append(_ref(chk, f"{p}.{key}", v, stages_raw, name,
                                 also=f" or a {' / '.join(suffixes)} file" if key in stype.file_refs else ""))
        parsed[name] = {"raw": st, "type": typ, "options": options, "deps": tuple(dict.fromkeys(refs)),
                        "files": files}
    order = _toposort(chk, parsed)
    out: dict[str, StageSpec] = {}
    for name in order:
        info, st = parsed[name], parsed[name]["raw"]
        p = f"stages.{name}"
        if "from" in st:
            up = out[st["from"]]
            model, kwargs = up.model, dict(up.kwargs)
        else:
            model = chk.typed(st["model"], f"{p}.model", "str")
            kwargs = dict(chk.mapping(st.get("kwargs", {}) or {}, f"{p}.kwargs"))
            check_model_kwargs(chk, p, model, kwargs, dataset)
        seed = st.get("seed")
        if seed is not None:
            for dep in info["deps"]:
                if out[dep].seed is None:
                    raise chk.fail(f"{p}.seed", f"a stage with a fixed seed cannot depend on stage {short_value(dep)}, "
                                                "which follows the recipe's seeds; give it a fixed seed too")
        out[name] = StageSpec(name=name, type=info["type"], model=model, kwargs=kwargs, source=st.get("from"),
                              seed=seed, options=info["options"], deps=info["deps"], files=info["files"])
    return out


def _check_stage(chk: Checker, p: str, name: str, st: Any, defaults: dict) -> tuple[str, dict[str, Any]]:
    """The common keys of one stage and its type's own validation: (type name, validated options)."""
    if not STAGE_NAME.match(name):
        raise chk.fail(p, f"stage name {short_value(name)} is not allowed; use letters, digits, '_' and '-'")
    chk.mapping(st, p)
    if "type" not in st:
        raise chk.fail(f"{p}.type", "missing required key; allowed: " + ", ".join(STAGE_TYPES))
    typ = chk.typed(st["type"], f"{p}.type", "str")
    if typ not in STAGE_TYPES:
        raise chk.fail(f"{p}.type", f"{short_value(typ)} is not a stage type; allowed: " + ", ".join(STAGE_TYPES))
    stype = STAGE_TYPES[typ]
    chk.mapping(st, p, {**COMMON_STAGE_KEYS, **stype.keys})
    if stype.needs_model and ("model" in st) == ("from" in st):
        raise chk.fail(p, "give exactly one of `model` (a registered model) or `from` (an earlier stage)")
    if not stype.needs_model and "model" in st:
        raise chk.fail(f"{p}.model", f"a {typ} stage takes its model through `from`, not `model`")
    if not stype.needs_model and "from" not in st:
        raise chk.fail(f"{p}.from", f"missing required key: a {typ} stage transforms the model of an earlier "
                                    "stage; name it with `from`")
    if "kwargs" in st and "model" not in st:
        raise chk.fail(f"{p}.kwargs", "`kwargs` goes with `model`; a `from` stage inherits its model")
    if "seed" in st:
        _seed_value(chk, st["seed"], f"{p}.seed")
    if "description" in st:
        chk.typed(st["description"], f"{p}.description", "str")
    return typ, stype.validate(chk, p, st, defaults)


def chain_stages(chk: Checker, source: StageSpec, stages: dict[str, dict], defaults: dict | None = None
                 ) -> list[StageSpec]:
    """Validate stages that each transform the previous one's model, starting from `source`'s, outside a recipe
    file (zoo.finetune's `--then` steps): the same checks as a recipe's stages, `from` set here."""
    out: list[StageSpec] = []
    prev = source
    for name, st in stages.items():
        if "from" in st or "model" in st:
            raise chk.fail(f"stages.{name}", "a chained stage takes the previous stage's model; give no `from` or "
                                             "`model`")
        raw = {**st, "from": prev.name}
        typ, options = _check_stage(chk, f"stages.{name}", name, raw, defaults or {})
        if STAGE_TYPES[typ].ref_keys and any(k in raw for k in STAGE_TYPES[typ].ref_keys):
            raise chk.fail(f"stages.{name}", "a chained stage cannot refer to other stages")
        prev = StageSpec(name=name, type=typ, model=source.model, kwargs=dict(source.kwargs), source=prev.name,
                         seed=source.seed, options=options, deps=(prev.name,))
        out.append(prev)
    return out


def _ref(chk: Checker, path: str, value: Any, stages: dict, self_name: str, also: str = "") -> str:
    chk.typed(value, path, "str")
    if value == self_name:
        raise chk.fail(path, f"a stage cannot refer to itself ({short_value(value)})")
    if value not in stages:
        raise chk.fail(path, f"{short_value(value)} is not a stage; allowed: " + ", ".join(s for s in stages if s != self_name)
                       + also)
    return value


def _toposort(chk: Checker, parsed: dict[str, dict]) -> list[str]:
    """Stages in dependency order (ties keep file order); a cycle fails naming its path."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(n: str, trail: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cyc = trail[trail.index(n):] + [n]
            first = cyc[0]
            key = next(k for k in ("from",) + STAGE_TYPES[parsed[first]["type"]].ref_keys
                       if parsed[first]["raw"].get(k) == cyc[1])
            raise chk.fail(f"stages.{first}.{key}", "stages form a cycle: " + " -> ".join(cyc)
                           + "; references must point to stages that do not depend back on this one")
        state[n] = 1
        for d in parsed[n]["deps"]:
            visit(d, trail + [n])
        state[n] = 2
        order.append(n)

    for n in parsed:
        visit(n, [])
    return order


def _table(chk: Checker, t: Any, stages: dict[str, StageSpec]) -> tuple[list[RowSpec], list[str]]:
    if t is None:
        t = {}
    if isinstance(t, list):
        t = {"rows": t}
    chk.mapping(t, "table", {"rows": "list of stage names or {stage, label, reference}",
                             "columns": "list of column names: " + ", ".join(COLUMNS)})
    rows_raw = t.get("rows", list(stages))
    if not isinstance(rows_raw, list) or not rows_raw:
        raise chk.fail("table.rows", f"expected a non-empty list, got {type_name(rows_raw)} {short_value(rows_raw)}")
    rows: list[RowSpec] = []
    for i, r in enumerate(rows_raw):
        p = f"table.rows[{i}]"
        if isinstance(r, str):
            r = {"stage": r}
        chk.mapping(r, p, ROW_KEYS, required=("stage",))
        stage = chk.typed(r["stage"], f"{p}.stage", "str")
        if stage not in stages:
            raise chk.fail(f"{p}.stage", f"{short_value(stage)} is not a stage; allowed: " + ", ".join(stages))
        label = chk.typed(r.get("label", default_label(stages[stage])), f"{p}.label", "str")
        ref = dict(chk.mapping(r.get("reference", {}) or {}, f"{p}.reference", REFERENCE_KEYS))
        for k in ("top1", "base_top1", "errors_per_10k", "params"):
            if ref.get(k) is not None:
                ref[k] = chk.typed(ref[k], f"{p}.reference.{k}", "float")
        if "source" in ref:
            chk.typed(ref["source"], f"{p}.reference.source", "str")
        if any(ref.get(k) is not None for k in ("top1", "errors_per_10k", "params")) and not ref.get("source"):
            raise chk.fail(f"{p}.reference.source", "a published number needs its source")
        rows.append(RowSpec(stage=stage, label=label, reference=ref))
    if len({r.stage for r in rows}) != len(rows):
        raise chk.fail("table.rows", "each stage may appear in at most one row")
    columns = chk.typed(t.get("columns", list(DEFAULT_COLUMNS)), "table.columns", "str_list")
    for i, c in enumerate(columns):
        if c not in COLUMNS:
            raise chk.fail(f"table.columns[{i}]", f"{short_value(c)} is not a column; allowed: " + ", ".join(COLUMNS))
    return rows, list(columns)


def default_label(stage: StageSpec) -> str:
    """`model (k=v, ...)` from the kwargs as written in the recipe."""
    kw = ", ".join(f"{k}={v}" for k, v in stage.kwargs.items() if k not in ("resolution", "in_chans", "num_classes"))
    return f"{stage.model} ({kw})" if kw else stage.model


def _quick(chk: Checker, q: Any, seeds: list[int]) -> dict[str, Any]:
    chk.mapping(q, "quick", QUICK_KEYS)
    out: dict[str, Any] = {"seeds": seeds[:1], "train": {"epochs": 1}}
    if "seeds" in q:
        s = chk.typed(q["seeds"], "quick.seeds", "int_list")
        if not s or len(set(s)) != len(s) or min(s) < 0:
            raise chk.fail("quick.seeds", f"{short_value(s)} is not allowed; expected a non-empty list of distinct ints >= 0")
        out["seeds"] = list(s)
    if "train" in q:
        out["train"] = check_train_config(chk, "quick.train", chk.mapping(q["train"], "quick.train"), partial=True)
    out["finetune"] = out["train"]
    if "finetune" in q:
        out["finetune"] = check_train_config(chk, "quick.finetune", chk.mapping(q["finetune"], "quick.finetune"),
                                             partial=True)
    return out


def _check_quick_merges(chk: Checker, quick: dict[str, Any], stages: dict[str, StageSpec]) -> None:
    """Every train section with the --quick overrides it gets (quick.finetune for a `finetunes` stage type,
    else quick.train) is a valid TrainConfig: e.g. quick epochs below a stage's warmup_epochs fail here,
    not in the middle of a --quick run. The error names the override key the message is about, if any."""
    for name, spec in stages.items():
        if "train" not in spec.options:
            continue
        key = "finetune" if STAGE_TYPES[spec.type].finetunes else "train"
        try:
            TrainConfig.from_dict({"progress": False, **spec.options["train"], **quick[key]})
        except (ZooError, ValueError, TypeError) as e:
            msg = str(e)
            k = next((k for k in sorted(quick[key], key=len, reverse=True)
                      if re.search(rf"(?<![\w]){re.escape(k)}(=|'|\s)", msg)), None)
            raise chk.fail(f"quick.{key}" + (f".{k}" if k else ""),
                           f"{msg} (with stages.{name}'s {key} section)") from None
