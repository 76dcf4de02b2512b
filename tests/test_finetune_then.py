"""`zoo finetune --then`: the steps compile into recipe stage specs (the same a recipe gives), run through the
recipe runners, and give the model the direct zoo.compress pipeline gives (structured magnitude prune, a short
recovery fine-tune, static int8 calibrated on training batches) for a fixed seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zoo.compress as zc
from test_finetune import make_folder  # noqa: E402  (tests/ is on sys.path)
from zoo.data import get_loaders
from zoo.errors import ZooError
from zoo.finetune import finetune, parse_then, then_recovery, then_specs
from zoo.recipe import StageSpec
from zoo.recipe.schema import validate_recipe
from zoo.train import TrainConfig, evaluate, fit

KW = {"width": 0.25}
SIZE = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("then") / "data")


def test_recovery_is_half_the_epochs_at_a_fifth_of_the_lr() -> None:
    rec = then_recovery(TrainConfig(epochs=5, batch_size=8, lr=0.01, progress=False))
    assert rec == {"epochs": 2, "batch_size": 8, "lr": pytest.approx(0.002), "warmup_epochs": 0.0, "progress": False,
                   "device": "auto"}
    assert then_recovery(TrainConfig(epochs=1, lr=0.1))["epochs"] == 1


def test_then_compiles_to_the_stages_a_recipe_gives(tmp_path: Path) -> None:
    recovery = then_recovery(TrainConfig(epochs=2, batch_size=8, lr=0.01, progress=False))
    source = StageSpec("finetune", "train", "mobilenet_v1", dict(KW), None, 0, {}, ())
    specs = then_specs(parse_then("prune=0.5,quantize=static"), source, recovery, 8)
    raw = {"dataset": {"name": "imagefolder", "input_size": [3, SIZE, SIZE], "root": str(tmp_path)},
           "stages": {"finetune": {"type": "train", "model": "mobilenet_v1", "kwargs": dict(KW), "seed": 0},
                      "prune": {"type": "prune", "from": "finetune", "amount": 0.5, "criterion": "magnitude",
                                "granularity": "channel", "finetune": dict(recovery)},
                      "quantize": {"type": "quantize", "from": "prune", "method": "static", "batch_size": 8}}}
    recipe = validate_recipe(raw, tmp_path / "then.yaml")
    assert [s.name for s in specs] == ["prune", "quantize"]
    for spec in specs:
        want = recipe.stages[spec.name]
        assert (spec.type, spec.model, spec.kwargs, spec.source, spec.deps) == \
            (want.type, want.model, want.kwargs, want.source, want.deps)
        assert spec.options == want.options, spec.name
    assert specs[0].options["train"] == recovery and specs[1].options["calibration"] == 8
    dynamic = then_specs(parse_then("quantize=dynamic"), source, recovery, 8)
    assert dynamic[0].options["batch_size"] == 8 and dynamic[0].source == "finetune"  # its evaluation batches


@pytest.mark.parametrize("then,words", [
    ("prune=1.5", ["--then prune='1.5'", "(0, 1)"]),
    ("prune=0", ["--then prune='0'", "(0, 1)"]),
    ("prune=x", ["--then prune='x'", "expected a number"]),
    ("quantize=qat", ["--then quantize='qat'", "allowed: static, dynamic"]),
    ("prune=0.3,prune=2", ["--then prune='2'", "(0, 1)"]),
])
def test_bad_steps_fail_naming_the_step(then: str, words: list[str]) -> None:
    with pytest.raises(ZooError) as e:
        parse_then(then)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_repeated_steps_get_distinct_stage_names() -> None:
    source = StageSpec("finetune", "train", "mobilenet_v1", dict(KW), None, 0, {}, ())
    specs = then_specs(parse_then("prune=0.3,prune=0.5"), source, None, 8)
    assert [(s.name, s.source) for s in specs] == [("prune", "finetune"), ("prune_2", "prune")]


def test_then_gives_the_model_of_the_direct_compress_pipeline(folder: Path, tmp_path: Path) -> None:
    common = dict(epochs=2, batch_size=8, lr=0.05, seed=0, input_size=SIZE, progress=False, **KW)
    dense = finetune("mobilenet_v1", folder, out=tmp_path / "dense", **common).model
    res = finetune("mobilenet_v1", folder, out=tmp_path / "small", then="prune=0.5,quantize=static", **common)
    # the pipeline --then ran before it compiled into recipe stages, written out with zoo.compress and zoo.train
    train, val, _ = get_loaders("imagefolder", (3, SIZE, SIZE), batch_size=8, root=folder, seed=0)
    pruned = zc.prune(dense, 0.5, criterion="magnitude", granularity="channel", example_inputs=next(iter(train))[0][:1])
    before = evaluate(pruned, val)
    fit(pruned, train, val, TrainConfig(epochs=1, batch_size=8, lr=0.05 * 0.2, warmup_epochs=0.0, seed=0,
                                        progress=False))
    calibration = [x for _, (x, _) in zip(range(8), train)]
    want = zc.quantize(pruned.cpu().eval(), "static", calibration=calibration)
    prune_rec, quant_rec = res.steps
    assert prune_rec["val_top1_before_finetune"] == before["top1"] and len(prune_rec["epochs"]) == 1
    assert prune_rec["finetune"] == {"epochs": 1, "lr": pytest.approx(0.01)}
    assert quant_rec["calibration_images"] == sum(len(x) for x in calibration)
    got_state, want_state = res.model.state_dict(), want.state_dict()
    assert list(got_state) == list(want_state)
    for k, v in want_state.items():
        g = got_state[k]
        if isinstance(v, torch.Tensor):
            assert torch.equal(g.int_repr() if g.is_quantized else g, v.int_repr() if v.is_quantized else v), k
    x = torch.cat([xb for xb, _ in val])
    with torch.no_grad():
        assert torch.equal(res.model(x), want(x))
    assert res.metrics["final"]["val_top1"] == evaluate(want, val)["top1"]
