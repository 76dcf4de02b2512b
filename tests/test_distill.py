"""Tests of zoo.distill: the Hinton et al. 2015 loss against a hand computation, FitNets hints, a frozen
eval-mode teacher during distillation, exact resume with a hint adapter, and teacher loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import zoo
import zoo.distill as zd
from zoo.data import get_loaders
from zoo.distill import FeatureHint, KDConfig, KDLoss, distill, load_teacher
from zoo.errors import ZooError
from zoo.io import load_tensors
from zoo.spec import ModelSpec
from zoo.weights import save_checkpoint
from zoo.train import TrainConfig


def _softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def _hand_kd(s: list[list[float]], t: list[list[float]], y: list[int], temp: float, alpha: float) -> float:
    """alpha * T^2 * mean_i KL(p_t || p_s) + (1 - alpha) * mean_i -log softmax(s_i)[y_i], written out."""
    kl = ce = 0.0
    for si, ti, yi in zip(s, t, y):
        ps, pt = _softmax(si, temp), _softmax(ti, temp)
        kl += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
        ce += -math.log(_softmax(si, 1.0)[yi])
    n = len(y)
    return alpha * temp * temp * kl / n + (1 - alpha) * ce / n


S = [[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -2.0], [1.0, 1.0, 1.0, 1.5]]
T = [[1.5, 0.0, 1.0, -0.5], [-1.0, 0.5, 2.0, 0.0], [3.0, -2.0, 0.0, 1.0]]
Y = [0, 2, 1]


@pytest.mark.parametrize("temp,alpha", [(4.0, 0.9), (1.0, 0.5), (2.5, 0.3), (0.5, 1.0), (3.0, 0.0)])
def test_kd_loss_matches_hand_computation(temp, alpha):
    got = KDLoss(temp, alpha)(torch.tensor(S), torch.tensor(Y), torch.tensor(T)).item()
    assert got == pytest.approx(_hand_kd(S, T, Y, temp, alpha), rel=1e-5)


def test_kd_loss_scaling_and_extremes():
    s, t, y = torch.tensor(S), torch.tensor(T), torch.tensor(Y)
    soft = lambda temp: _hand_kd(S, T, Y, temp, 1.0) / temp**2  # noqa: E731  (the bare KL)
    assert KDLoss(3.0, 1.0)(s, y, t).item() == pytest.approx(9 * soft(3.0), rel=1e-5)  # T^2 factor
    # alpha = 1: only the teacher matters; alpha = 0: plain cross-entropy on the labels
    assert KDLoss(2.0, 1.0)(s, torch.tensor([3, 3, 3]), t).item() == pytest.approx(KDLoss(2.0, 1.0)(s, y, t).item())
    assert KDLoss(2.0, 0.0)(s, y, t).item() == pytest.approx(nn.functional.cross_entropy(s, y).item(), rel=1e-6)
    assert KDLoss(2.0, 1.0)(t, y, t).item() == pytest.approx(0.0, abs=1e-6)  # student == teacher
    # gradients of the soft term keep their scale as T grows (the point of T^2)
    grads = []
    for temp in (2.0, 8.0):
        x = s.clone().requires_grad_(True)
        KDLoss(temp, 1.0)(x, y, t).backward()
        grads.append(x.grad.abs().sum().item())
    assert 0.2 < grads[1] / grads[0] < 5


def test_kd_validation():
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ZooError, match="temperature=.* is not allowed; expected a finite number > 0"):
            KDLoss(temperature=bad)
    for bad in (-0.1, 1.5):
        with pytest.raises(ZooError, match="alpha=.* is not allowed; expected a number in \\[0, 1\\]"):
            KDConfig(alpha=bad)
    with pytest.raises(ZooError, match="give both layers"):
        KDConfig(hint_student_layer="features.2")
    with pytest.raises(ZooError, match="hint_weight=-1 is not allowed"):
        KDConfig(hint_student_layer="a", hint_teacher_layer="b", hint_weight=-1)
    with pytest.raises(ZooError, match="unknown kd config key\\(s\\) 'T'; accepted: temperature, alpha"):
        KDConfig.from_dict({"T": 4})
    with pytest.raises(ZooError, match="student logits \\(3, 4\\) and teacher logits \\(3, 5\\) differ"):
        KDLoss()(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.zeros(3, 5))


class Net(nn.Module):
    """Small CNN: features.2 is an (N, w, 8, 8) map, features.3 the (N, w, 4, 4) pooled map."""

    def __init__(self, width: int, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(2 * width, num_classes)
        self.spec = ModelSpec(name=None, input_size=(1, 8, 8))  # not a zoo model; it declares its input

    def forward(self, x):
        return self.classifier(self.features(x))


def test_feature_hint_adapter_pooling_and_gradients():
    student, teacher = Net(4), Net(12)
    hint = FeatureHint(student, teacher, "features.2", "features.3", weight=2.0)
    assert (hint.adapter.in_channels, hint.adapter.out_channels, hint.out_hw) == (4, 12, (4, 4))
    x = torch.randn(5, 1, 8, 8)
    student(x)
    with torch.no_grad():
        teacher(x)
    loss = hint.loss()
    assert loss.item() > 0 and hint.adapter.weight.grad is None
    loss.backward()
    assert hint.adapter.weight.grad.abs().sum() > 0
    assert student.features[0].weight.grad.abs().sum() > 0  # the hint trains the student too
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ZooError, match="needs a student and a teacher forward pass"):
        hint.loss()
    hint.remove()
    with pytest.raises(ZooError, match="teacher layer 'feature.3' not found; did you mean features.3.*valid names"):
        FeatureHint(student, teacher, "features.2", "feature.3")
    with pytest.raises(ZooError, match="student layer 'classifier' outputs shape .*hints need \\(N, C, H, W\\)"):
        FeatureHint(student, teacher, "classifier", "features.3")


def _loaders():
    return get_loaders("digits", (1, 8, 8), batch_size=32, quick=True)


def test_teacher_frozen_and_in_eval_mode_during_distill(tmp_path):
    torch.manual_seed(0)
    student, teacher = Net(4), Net(12)
    teacher.train()  # distill must switch it to eval and keep it there
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []
    teacher.register_forward_pre_hook(
        lambda m, inp: seen.append((m.training, any(p.requires_grad for p in m.parameters()), torch.is_grad_enabled())))
    tr, va, _ = _loaders()
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, weight_decay=0.0, progress=False)
    kd = KDConfig(temperature=3.0, alpha=0.7, hint_student_layer="features.2", hint_teacher_layer="features.3")
    torch.manual_seed(1)
    res = distill(student, teacher, tr, va, cfg, kd, out_dir=tmp_path)
    # one probe forward (FeatureHint finds the feature shapes), then one per training step
    assert len(seen) == 1 + 2 * len(tr) and set(seen) == {(False, False, False)}  # eval, frozen, no autograd
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics untouched
    assert res.history[-1]["epoch"] == 2 and math.isfinite(res.final["loss"])
    # the adapter was optimised (weight decay is 0, so only gradients can have moved it)
    torch.manual_seed(1)
    init = FeatureHint(Net(4), Net(12), "features.2", "features.3").adapter.weight
    trained = load_tensors(tmp_path / "resume.safetensors")["extra.0"]
    assert trained.shape == init.shape and not torch.allclose(trained, init)
    assert student.features[0].weight.requires_grad


def test_distill_resume_with_hint_is_exact(tmp_path, monkeypatch):
    def run(out, crash_at=None):
        torch.manual_seed(0)
        student, teacher = Net(4), Net(12)
        tr, va, _ = _loaders()
        calls = {"n": 0}
        real = KDLoss.forward

        def forward(self, *a):
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise KeyboardInterrupt
            return real(self, *a)

        monkeypatch.setattr(zd.KDLoss, "forward", forward)
        cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, progress=False, warmup_epochs=0.5)
        kd = KDConfig(hint_student_layer="features.2", hint_teacher_layer="features.3", hint_weight=0.5)
        try:
            res = distill(student, teacher, tr, va, cfg, kd, out_dir=out, resume=crash_at is None and out.exists())
        except KeyboardInterrupt:
            res = None
        monkeypatch.setattr(zd.KDLoss, "forward", real)
        return student, res

    full, rf = run(tmp_path / "full")
    run(tmp_path / "cut", crash_at=12)
    resumed, rr = run(tmp_path / "cut")
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and rr.final == rf.final
    assert torch.equal(load_tensors(tmp_path / "full" / "resume.safetensors")["extra.0"],
                       load_tensors(tmp_path / "cut" / "resume.safetensors")["extra.0"])


def test_load_teacher(tmp_path):
    torch.manual_seed(0)
    m = zoo.create("mlp", hidden=(16,), resolution=8, num_classes=10)
    save_checkpoint(m, tmp_path / "t.safetensors")
    t = load_teacher(tmp_path / "t.safetensors")
    assert t.spec.name == "mlp" and t.spec.kwargs["hidden"] == (16,) and not t.training
    assert all(not p.requires_grad for p in t.parameters())
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), t.state_dict().values()))
    t2 = load_teacher({"name": "mlp", "kwargs": {"hidden": (16,), "resolution": 8},
                       "weights": str(tmp_path / "t.safetensors")})
    assert torch.equal(t2.classifier.weight, m.classifier.weight)
    assert load_teacher(m) is m and not m.training
    with pytest.raises(ZooError, match="does not exist"):
        load_teacher(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ZooError, match="has no zoo.spec header"):
        load_teacher(tmp_path / "bare.safetensors")
    with pytest.raises(ZooError, match="needs 'name', optional 'kwargs' and 'weights'"):
        load_teacher({"name": "mlp"})


def test_distill_rejects_mismatched_classes():
    s = zoo.create("mlp", hidden=(8,), resolution=8, num_classes=10)
    t = zoo.create("mlp", hidden=(8,), resolution=8, num_classes=5)
    tr, va, _ = _loaders()
    with pytest.raises(ZooError, match="the student has 10 classes but the teacher 5"):
        distill(s, t, tr, va, TrainConfig(epochs=1, batch_size=32, progress=False), KDConfig())
