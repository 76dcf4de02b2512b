"""Knowledge distillation: Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"
(arXiv:1503.02531), with optional FitNets hints (Romero et al. 2015, "FitNets: Hints for Thin Deep
Nets", ICLR 2015, arXiv:1412.6550).

The student minimises  alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)
(+ hint_weight * MSE(adapter(student feature), teacher feature) with a learned 1x1 conv adapter).
The teacher is frozen and stays in eval mode; training runs through `zoo.train.fit`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from zoo._registry import create
from zoo.errors import ZooError
from zoo.spec import input_size as input_size_of, spec_of
from zoo.weights.checkpoint import load_checkpoint, model_spec
from zoo.train import TrainConfig, TrainResult, config_from_dict, fit, init_distributed, resolve_device


def _check_kd(temperature: Any, alpha: Any) -> tuple[float, float]:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ZooError(f"distillation temperature={temperature!r} is not allowed; expected a finite number > 0")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ZooError(f"distillation alpha={alpha!r} is not allowed; expected a number in [0, 1]")
    return float(temperature), float(alpha)


class KDLoss(nn.Module):
    """Hinton et al. 2015: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    The KL term is averaged over the batch; T^2 keeps its gradients on the scale of the hard term.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9):
        super().__init__()
        self.temperature, self.alpha = _check_kd(temperature, alpha)

    def forward(self, student_logits: Tensor, targets: Tensor, teacher_logits: Tensor) -> Tensor:
        """Distillation loss of a batch (scalar)."""
        if student_logits.shape != teacher_logits.shape:
            raise ZooError(f"KDLoss: student logits {tuple(student_logits.shape)} and teacher logits "
                           f"{tuple(teacher_logits.shape)} differ; the teacher needs the same classes")
        t = self.temperature
        s_log = F.log_softmax(student_logits.float() / t, dim=1)
        t_log = F.log_softmax(teacher_logits.float() / t, dim=1)
        soft = F.kl_div(s_log, t_log, reduction="batchmean", log_target=True) * (t * t)
        if self.alpha == 1.0:
            return soft
        hard = F.cross_entropy(student_logits.float(), targets)
        return self.alpha * soft + (1.0 - self.alpha) * hard


def _module(model: nn.Module, name: str, who: str) -> nn.Module:
    mods = dict(model.named_modules())
    if not isinstance(name, str) or name not in mods or name == "":
        names = [n for n in mods if n]
        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.4)
        tops = [n for n in names if "." not in n][:8]
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ZooError(f"{who} layer {name!r} not found; {hint}valid names include: {', '.join(tops)} "
                       f"(any name from model.named_modules(), e.g. {names[min(len(names) - 1, len(names) // 2)]!r})")
    return mods[name]


class FeatureHint(nn.Module):
    """FitNets hint (Romero et al. 2015): weight * MSE(1x1-conv adapter(student feature), teacher feature).

    Features are captured with forward hooks on the named modules; if their spatial sizes differ, the
    larger one is adaptively average-pooled to the smaller. Call `loss()` after both forward passes.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layer: str, teacher_layer: str,
                 weight: float = 1.0, input_size: tuple[int, int, int] | None = None):
        super().__init__()
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ZooError(f"hint weight={weight!r} is not allowed; expected a finite number >= 0")
        self.weight = float(weight)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        s_mod = _module(student, student_layer, "student")
        t_mod = _module(teacher, teacher_layer, "teacher")
        self._feats: dict[str, Tensor] = {}
        self._handles = [s_mod.register_forward_hook(self._hook("s")), t_mod.register_forward_hook(self._hook("t"))]
        try:
            size = input_size_of(student, input_size, what="FeatureHint: input_size")
        except ZooError:
            self.remove()
            raise
        s_shape, t_shape = self._probe(student, teacher, size)
        for who, layer, shape in (("student", student_layer, s_shape), ("teacher", teacher_layer, t_shape)):
            if len(shape) != 4:
                self.remove()
                raise ZooError(f"{who} layer {layer!r} outputs shape {shape}; hints need (N, C, H, W) feature maps")
        self.adapter = nn.Conv2d(s_shape[1], t_shape[1], kernel_size=1, bias=False)
        self.out_hw = (min(s_shape[2], t_shape[2]), min(s_shape[3], t_shape[3]))

    def _hook(self, key: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self._feats[key] = output
        return hook

    def _probe(self, student: nn.Module, teacher: nn.Module, size: tuple[int, int, int]) -> tuple[tuple, tuple]:
        modes = (student.training, teacher.training)
        student.eval(), teacher.eval()
        dev = next(iter(student.parameters())).device
        with torch.no_grad():
            x = torch.zeros(2, *size, device=dev)
            student(x)
            teacher(x.to(next(iter(teacher.parameters())).device))
        student.train(modes[0]), teacher.train(modes[1])
        shapes = tuple(self._feats[k].shape for k in ("s", "t"))
        self._feats.clear()
        return shapes

    def _pool(self, x: Tensor) -> Tensor:
        return x if tuple(x.shape[-2:]) == self.out_hw else F.adaptive_avg_pool2d(x, self.out_hw)

    def loss(self) -> Tensor:
        """weight * MSE between the adapted student feature and the teacher feature of the last batch."""
        if "s" not in self._feats or "t" not in self._feats:
            raise ZooError("FeatureHint.loss() needs a student and a teacher forward pass first")
        s, t = self._feats.pop("s"), self._feats.pop("t")
        s = self._pool(self.adapter(s.to(self.adapter.weight.dtype)))
        return self.weight * F.mse_loss(s.float(), self._pool(t.detach()).float())

    def remove(self) -> None:
        """Detach the forward hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._feats.clear()


@dataclass
class KDConfig:
    """Distillation settings of `distill` (recipes: the `kd` section)."""

    temperature: float = 4.0  # softmax temperature T of Hinton et al. 2015
    alpha: float = 0.9  # weight of the soft (teacher) term; 1 - alpha weighs the cross-entropy on labels
    hint_student_layer: str | None = None  # FitNets: student module name (see model.named_modules())
    hint_teacher_layer: str | None = None  # FitNets: teacher module name; both or neither
    hint_weight: float = 1.0  # weight of the hint MSE term (used only with hint layers)

    def __post_init__(self) -> None:
        self.temperature, self.alpha = _check_kd(self.temperature, self.alpha)
        s, t = self.hint_student_layer, self.hint_teacher_layer
        for name, v in (("hint_student_layer", s), ("hint_teacher_layer", t)):
            if v is not None and (not isinstance(v, str) or not v):
                raise ZooError(f"KDConfig: {name}={v!r} is not allowed; expected a module name or None")
        if (s is None) != (t is None):
            raise ZooError(f"KDConfig: hint_student_layer={s!r} and hint_teacher_layer={t!r}: give both layers "
                           "for a FitNets hint, or neither")
        w = self.hint_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ZooError(f"KDConfig: hint_weight={w!r} is not allowed; expected a finite number >= 0")
        self.hint_weight = float(w)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KDConfig":
        """Build from a mapping; unknown keys are rejected with the accepted list."""
        return config_from_dict(cls, d, "kd")


def load_teacher(spec_or_path: str | os.PathLike | Mapping[str, Any] | nn.Module) -> nn.Module:
    """A frozen eval-mode teacher from a zoo safetensors file (rebuilt from its zoo.spec), a spec
    mapping {"name", "kwargs", "weights": path} or a model."""
    if isinstance(spec_or_path, nn.Module):
        model = spec_or_path
    elif isinstance(spec_or_path, (str, os.PathLike)):
        model = load_checkpoint(spec_or_path)
    elif isinstance(spec_or_path, Mapping):
        spec = dict(spec_or_path)
        if not isinstance(spec.get("name"), str) or spec.get("weights") is None:
            raise ZooError(f"teacher spec {spec!r} needs 'name', optional 'kwargs' and 'weights' (a .safetensors "
                           "file); a teacher without trained weights is useless")
        model = create(spec["name"], weights=spec["weights"], **dict(spec.get("kwargs") or {}))
    else:
        raise ZooError(f"teacher must be a path, a spec mapping or an nn.Module, got {type(spec_or_path).__name__}")
    return freeze(model)


def freeze(model: nn.Module) -> nn.Module:
    """Turn off gradients and switch to eval mode (in place); returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class _DistillLoss:
    """loss_fn(logits, targets, inputs) for fit: KD on the teacher's logits, plus the optional hint."""

    def __init__(self, teacher: nn.Module, kd: KDLoss, hint: FeatureHint | None):
        self.teacher, self.kd, self.hint = teacher, kd, hint

    def __call__(self, logits: Tensor, targets: Tensor, inputs: Tensor) -> Tensor:
        if self.teacher.training:  # something switched it (e.g. a parent's .train()); keep BN stats frozen
            self.teacher.eval()
        with torch.no_grad():
            t_logits = self.teacher(inputs)
        loss = self.kd(logits, targets, t_logits)
        if self.hint is not None:
            loss = loss + self.hint.loss()
        return loss


def distill(student: nn.Module, teacher: nn.Module, train_loader: DataLoader, val_loader: DataLoader,
            cfg: TrainConfig, kd: KDConfig, out_dir: str | os.PathLike | None = None, resume: bool = False,
            meta: dict[str, Any] | None = None) -> TrainResult:
    """Train `student` (in place) to match a frozen eval-mode `teacher` (Hinton et al. 2015, + FitNets)."""
    if not isinstance(kd, KDConfig):
        raise ZooError(f"distill: kd must be a KDConfig, got {type(kd).__name__}")
    if not isinstance(teacher, nn.Module) or teacher is student:
        raise ZooError("distill: the teacher must be an nn.Module other than the student")
    s_spec, t_spec = spec_of(student), spec_of(teacher)
    s_cls = s_spec.kwargs.get("num_classes") if s_spec is not None else None
    t_cls = t_spec.kwargs.get("num_classes") if t_spec is not None else None
    if s_cls is not None and t_cls is not None and s_cls != t_cls:
        raise ZooError(f"distill: the student has {s_cls} classes but the teacher {t_cls}; they must match")
    _, _, local = init_distributed(cfg.device)
    device = resolve_device(cfg.device, local)
    teacher = freeze(teacher).to(device)
    student.to(device)
    hint = None
    if kd.hint_student_layer is not None:
        hint = FeatureHint(student, teacher, kd.hint_student_layer, kd.hint_teacher_layer, kd.hint_weight).to(device)
    info = {"kd": dataclasses.asdict(kd)}
    if t_spec is not None and t_spec.name is not None:
        info["teacher"] = model_spec(teacher)
    try:
        return fit(student, train_loader, val_loader, cfg, out_dir=out_dir, resume=resume,
                   loss_fn=_DistillLoss(teacher, KDLoss(kd.temperature, kd.alpha), hint),
                   extra_params=list(hint.parameters()) if hint is not None else [], meta={**info, **(meta or {})})
    finally:
        if hint is not None:
            hint.remove()
