"""Tests of zoo.train: config validation, LR schedule, learning, no decay on norm/bias, checkpoints,
bit-exact resume, divergence handling, evaluate and the `zoo train` command."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

import zoo
from zoo.cli import main
from zoo.data import get_loaders
from zoo.errors import ZooError
from zoo.io import load_tensors
from zoo.train import TrainConfig, TrainingDiverged, evaluate, fit, lr_at

TIMING = ("images_per_s", "epoch_time_s")


class TinyCNN(nn.Module):
    """Conv-BN-ReLU, pooling, dropout and a linear head: every kind of state resume must restore."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.drop = nn.Dropout(0.3)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.classifier(self.drop(self.features(x)))


def _digits(batch_size=32, quick=True, size=(1, 8, 8)):
    return get_loaders("digits", size, batch_size=batch_size, quick=quick)


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=32, lr=0.1, progress=False, warmup_epochs=0.5, label_smoothing=0.1)
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value,expect", [
    ("optimizer", "adam", "optimizer='adam' is not allowed; expected one of 'sgd', 'adamw'"),
    ("schedule", "onecycle", "schedule='onecycle' is not allowed; expected one of 'cosine', 'linear', 'step', 'constant'"),
    ("lr", 0, "lr=0 is not allowed; expected a finite number > 0"),
    ("lr", float("nan"), "lr=nan is not allowed"),
    ("epochs", 0, "epochs=0 is not allowed; expected an int >= 1"),
    ("epochs", 2.5, "epochs=2.5 is not allowed"),
    ("batch_size", True, "batch_size=True is not allowed"),
    ("momentum", 1.0, "momentum=1.0 is not allowed; expected a finite number >= 0 and < 1"),
    ("weight_decay", -1e-4, "weight_decay=-0.0001 is not allowed"),
    ("warmup_epochs", 20, "warmup_epochs=20 is not allowed; expected a finite number >= 0 and <= 10"),
    ("gamma", 0, "gamma=0 is not allowed"),
    ("label_smoothing", 1, "label_smoothing=1 is not allowed"),
    ("grad_clip", 0, "grad_clip=0 is not allowed; expected None or a finite number > 0"),
    ("device", "tpu", "device='tpu' is not allowed; expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("amp", "yes", "amp='yes' is not allowed; expected True or False"),
    ("seed", -1, "seed=-1 is not allowed"),
])
def test_config_validation(field, value, expect):
    with pytest.raises(ZooError, match="TrainConfig: " + expect.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{field: value})


def test_config_from_dict_and_defaults():
    cfg = TrainConfig.from_dict({"epochs": 3, "lr": 1, "optimizer": "adamw"})
    assert (cfg.epochs, cfg.lr, cfg.optimizer) == (3, 1.0, "adamw") and isinstance(cfg.lr, float)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ZooError, match="unknown train config key\\(s\\) 'lrate'; accepted: epochs, batch_size, "
                                       "optimizer, lr"):
        TrainConfig.from_dict({"lrate": 0.1})
    with pytest.raises(ZooError, match="must be a mapping"):
        TrainConfig.from_dict([("lr", 0.1)])
    with pytest.raises(ZooError, match="nesterov=True needs momentum > 0"):
        TrainConfig(momentum=0)
    assert TrainConfig(momentum=0, nesterov=False).momentum == 0.0
    assert TrainConfig(epochs=4.0).epochs == 4


def test_lr_schedules():
    cfg = TrainConfig(epochs=4, lr=1.0, warmup_epochs=1)
    lrs = [lr_at(cfg, s, 10) for s in range(40)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up to lr
    assert lrs[10] == 1.0 and lrs[25] == pytest.approx(0.5)  # cosine from the end of warm-up, half-way at 25
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 29 / 30)))
    step = TrainConfig(epochs=10, lr=1.0, schedule="step", step_size=3, gamma=0.5)
    assert [lr_at(step, e * 5, 5) for e in range(10)] == [1, 1, 1, .5, .5, .5, .25, .25, .25, .125]
    assert {lr_at(TrainConfig(schedule="constant", lr=0.3), s, 7) for s in range(70)} == {0.3}


# ---------------------------------------------------------------------------------------------- fit

def test_fit_learns_digits_and_writes_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = zoo.create("mlp", hidden=(64,), resolution=8, num_classes=10)
    tr, va, info = get_loaders("digits", model.spec.input_size, batch_size=64)
    res = fit(model, tr, va, _cfg(epochs=3, batch_size=64), out_dir=tmp_path, meta={"classes": info.class_names})
    assert res.top1 >= 85.0 and res.best_top1 >= res.top1 - 1e-9 and len(res.history) == 3
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3] and log == res.history
    assert set(log[0]) == {"epoch", "train_loss", "val_loss", "top1", "top5", "lr", "images_per_s", "epoch_time_s"}
    assert log[0]["train_loss"] > log[-1]["train_loss"]
    manifest = json.loads((tmp_path / "last_state.json").read_text())
    assert manifest["epoch"] == 3 and manifest["files"]["last"] == "last.safetensors"
    with safe_open(str(tmp_path / "last.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["zoo.spec"])["name"] == "mlp" and json.loads(meta["zoo.epoch"]) == 3
    assert json.loads(meta["zoo.classes"]) == info.class_names
    # the saved weights reproduce the final metrics in a freshly built model
    fresh = zoo.create("mlp", hidden=(64,), resolution=8, num_classes=10)
    fresh.load_state_dict(load_tensors(tmp_path / "last.safetensors"))
    assert evaluate(fresh, va) == pytest.approx(res.final)
    assert (tmp_path / "best.safetensors").is_file() and set(res.paths) == {"last", "best", "resume", "state", "log"}


def test_no_weight_decay_on_norm_and_bias():
    """With zero gradients, plain SGD weight decay shrinks only the >= 2-d weights."""
    torch.manual_seed(0)
    model = TinyCNN()
    before = {k: v.clone() for k, v in model.named_parameters()}
    tr, va, _ = _digits()
    cfg = _cfg(epochs=1, momentum=0.0, nesterov=False, weight_decay=0.5, schedule="constant", warmup_epochs=0)
    fit(model, tr, va, cfg, loss_fn=lambda logits, y, x: logits.sum() * 0.0)
    shrink = (1 - 0.1 * 0.5) ** len(tr)
    for k, p in model.named_parameters():
        if p.ndim <= 1:
            assert torch.equal(p, before[k]), k
        else:
            assert torch.allclose(p, before[k] * shrink, atol=1e-6), k


def test_channels_last_adamw_grad_clip_runs():
    torch.manual_seed(0)
    tr, va, _ = _digits(size=(3, 8, 8))
    res = fit(TinyCNN(3), tr, va, _cfg(epochs=1, optimizer="adamw", lr=3e-3, channels_last=True, grad_clip=1.0))
    assert math.isfinite(res.final["loss"]) and 0 <= res.top1 <= 100


def test_fit_input_errors(tmp_path):
    tr, va, _ = _digits(batch_size=16)
    with pytest.raises(ZooError, match="batch_size=16 but cfg.batch_size=32"):
        fit(TinyCNN(), tr, va, _cfg())
    with pytest.raises(ZooError, match="cfg must be a TrainConfig"):
        fit(TinyCNN(), tr, va, {"epochs": 1})
    with pytest.raises(ZooError, match="cannot resume: no checkpoint .*resume.safetensors"):
        fit(TinyCNN(), tr, va, _cfg(batch_size=16), out_dir=tmp_path, resume=True)
    with pytest.raises(ZooError, match="resume=True needs out_dir"):
        fit(TinyCNN(), tr, va, _cfg(batch_size=16), resume=True)
    m = TinyCNN()
    with pytest.raises(ZooError, match="extra_params must not include parameters of the model"):
        fit(m, tr, va, _cfg(batch_size=16), extra_params=[m.classifier.weight])


class _Crash(Exception):
    pass


def _run(out_dir, optimizer, resume=False, crash_at=None, **aug):
    """Train TinyCNN for 2 epochs; `crash_at` kills the run at that global step (like a lost machine)."""
    torch.manual_seed(0)
    model = TinyCNN()
    tr, va, _ = _digits()
    calls = {"n": 0}

    def loss_fn(logits, y, x):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise _Crash()
        return F.cross_entropy(logits, y, label_smoothing=0.1)

    cfg = _cfg(optimizer=optimizer, lr=0.1 if optimizer == "sgd" else 3e-3, **aug)
    try:
        return model, fit(model, tr, va, cfg, out_dir=out_dir, resume=resume, loss_fn=loss_fn)
    except _Crash:
        return model, None


@pytest.mark.parametrize("optimizer,aug", [("sgd", {}), ("adamw", {}), ("sgd", {"crop_padding": 4, "hflip": True})])
def test_resume_is_bit_exact(tmp_path, optimizer, aug):
    full, res_full = _run(tmp_path / "full", optimizer, **aug)
    _, crashed = _run(tmp_path / "cut", optimizer, crash_at=11, **aug)  # 8 steps per epoch: dies in epoch 2
    assert crashed is None and json.loads((tmp_path / "cut" / "last_state.json").read_text())["epoch"] == 1
    resumed, res = _run(tmp_path / "cut", optimizer, resume=True, **aug)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res.final == res_full.final and res.best_top1 == res_full.best_top1
    strip = lambda h: [{k: v for k, v in r.items() if k not in TIMING} for r in h]  # noqa: E731
    assert strip(res.history) == strip(res_full.history)
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]


def test_resume_rejects_changed_config(tmp_path):
    tr, va, _ = _digits()
    fit(TinyCNN(), tr, va, _cfg(epochs=1), out_dir=tmp_path)
    with pytest.raises(ZooError, match=r"train config differs from the checkpoint's \(lr: 0.1 -> 0.2\)"):
        fit(TinyCNN(), tr, va, _cfg(epochs=2, lr=0.2), out_dir=tmp_path, resume=True)
    with pytest.raises(ZooError, match="checkpoint does not fit this model"):
        fit(TinyCNN(num_classes=5), tr, va, _cfg(epochs=2), out_dir=tmp_path, resume=True)


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    tr, va, _ = _digits()
    steps = len(tr)
    calls = {"n": 0}

    def loss_fn(logits, y, x):
        calls["n"] += 1
        loss = F.cross_entropy(logits, y)
        return loss * float("nan") if calls["n"] == steps + 3 else loss  # NaN at epoch 2, step 3

    with pytest.raises(TrainingDiverged, match=r"training diverged at epoch 2, step 3 \(iteration 11\): loss = nan; "
                                               r"the checkpoint of epoch 1 in .* is kept untouched") as e:
        fit(TinyCNN(), tr, va, _cfg(), out_dir=tmp_path, loss_fn=loss_fn)
    assert (e.value.epoch, e.value.step, math.isnan(e.value.loss)) == (2, 3, True)
    assert isinstance(e.value, ZooError)
    assert json.loads((tmp_path / "last_state.json").read_text())["epoch"] == 1
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1
    with safe_open(str(tmp_path / "last.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["zoo.epoch"]) == 1
    weights, resume = load_tensors(tmp_path / "last.safetensors"), load_tensors(tmp_path / "resume.safetensors")
    assert all(torch.equal(v, resume[f"model.{k}"]) for k, v in weights.items())  # same epoch, both files
    res = fit(TinyCNN(), tr, va, _cfg(), out_dir=tmp_path, resume=True)  # the kept checkpoint resumes
    assert [h["epoch"] for h in res.history] == [1, 2]


def test_huge_lr_diverges_with_message():
    torch.manual_seed(0)
    model = zoo.create("mlp", hidden=(32,), resolution=8, num_classes=10)
    tr, va, _ = _digits()
    with pytest.raises(TrainingDiverged, match="loss = (nan|inf).*no checkpoint was written yet.*Lower the learning"):
        fit(model, tr, va, _cfg(lr=1e12, warmup_epochs=0, label_smoothing=0.0))


def test_evaluate_exact_metrics():
    class Echo(nn.Module):  # logits are the inputs themselves
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return x + self.p

    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6.0], [0, 0, 0, 0, 9, 1]])
    y = torch.tensor([0, 4, 0, 5])
    batches = [(logits[:3], y[:3]), (logits[3:], y[3:])]
    m = evaluate(Echo(), batches)
    # sample 0: top-1 hit; sample 1: class 4 is 2nd -> top-5 hit; sample 2: class 0 is last -> miss; 3: 2nd
    assert m["top1"] == 25.0 and m["top5"] == 75.0
    expect = sum(-torch.log_softmax(logits[i], 0)[y[i]].item() for i in range(4)) / 4
    assert m["loss"] == pytest.approx(expect, rel=1e-6)


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_train_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--kw", "hidden=16", "--kw", "resolution=8", "--data", "digits", "--quick",
            "--epochs", "1", "--batch-size", "32", "--lr", "0.1", "--out", str(out), "--no-progress",
            "--hash-dir", str(tmp_path / "h")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "mlp on digits (256 train / 128 val images, world size 1): top1" in text
    assert (out / "last.safetensors").is_file() and (tmp_path / "h" / "rank0.sha256").is_file()
    args[args.index("--epochs") + 1] = "2"
    assert main(args + ["--resume"]) == 0
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    assert main(["train", "--model", "mlp", "--lr", "-1", "--out", str(out)]) == 2
    assert "zoo: error: TrainConfig: lr=-1.0 is not allowed; expected a finite number > 0" in capsys.readouterr().err
    assert main(["train", "--model", "mlp", "--kw", "num_classes=3", "--quick", "--out", str(out)]) == 2
    assert "num_classes=3 differs from the 10 classes of digits" in capsys.readouterr().err
