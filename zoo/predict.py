"""Prediction with a fine-tuned zoo checkpoint: rebuild the model from the safetensors header and
classify image files, preprocessed exactly like validation (channels, resize, normalise).

`zoo predict --weights OUT/model.safetensors a.png b.jpg` prints the top-5 class names with their
softmax probabilities for each image; `--folder DIR` scores a labelled folder (top-1/top-5). The
header must carry `zoo.spec`, `zoo.classes`, `zoo.mean` and `zoo.std` (written by `zoo finetune` /
`zoo.weights.save_checkpoint`); `zoo.input_size` is optional.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from zoo.data.common import ImageTransform
from zoo.data.imagefolder import IMAGE_EXTENSIONS, check_class_paths, load_image
from zoo.errors import ZooError
from zoo.spec import input_size
from zoo.untrusted import short_repr
from zoo.weights.checkpoint import load_checkpoint, read_checkpoint

DEFAULT_TOP = 5
MAX_INPUT_SIDE = 4096  # a header's zoo.input_size is refused beyond this (images are resized to it)


@dataclass
class Classifier:
    """A rebuilt model with what it needs to classify raw images: classes, normalisation, input size."""

    model: nn.Module
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    path: Path

    def preprocess(self, images: Sequence[str | os.PathLike]) -> torch.Tensor:
        """Decode image files and transform them like the validation split: (N, C, H, W) float32."""
        t = ImageTransform(self.input_size, self.mean, self.std)
        return torch.cat([t(load_image(os.fspath(p))[None]) for p in images])

    @torch.no_grad()
    def probabilities(self, images: Sequence[str | os.PathLike]) -> torch.Tensor:
        """Softmax probabilities (N, num_classes) for image files."""
        self.model.eval()
        return torch.softmax(self.model(self.preprocess(images)).float(), dim=1)


def _input_size(model: nn.Module, meta: dict[str, Any], path: Path) -> tuple[int, int, int]:
    """The header's zoo.input_size if it has one (checked), else the model's default input size."""
    size = meta.get("input_size")
    if size is None:
        return input_size(model)
    in_chans = model.spec.kwargs["in_chans"]
    ok = isinstance(size, (list, tuple)) and len(size) == 3 and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_INPUT_SIDE for v in size)
    if not ok or size[0] != in_chans:
        raise ZooError(f"weights {str(path)!r}: zoo.input_size={short_repr(size)} is not allowed; expected "
                       f"[C, H, W] with C = the model's {in_chans} input channels and H, W from 1 to {MAX_INPUT_SIDE}")
    return tuple(int(v) for v in size)


def load_classifier(weights: str | os.PathLike, allow_nonfinite: bool = False) -> Classifier:
    """Rebuild the model saved in a safetensors checkpoint, with its class names and normalisation.

    Weights or mean/std holding NaN/inf are refused unless `allow_nonfinite=True`.
    """
    if not isinstance(weights, (str, os.PathLike)) or not os.fspath(weights):
        raise ZooError(f"weights={short_repr(weights)} is not allowed; expected a path to a .safetensors file")
    ckpt = read_checkpoint(weights, allow_nonfinite=allow_nonfinite)
    if ckpt.spec is None:
        raise ZooError(f"weights {str(ckpt.path)!r} have no zoo.spec header, so the model cannot be rebuilt; "
                       "use a checkpoint written by `zoo finetune` or zoo.weights.save_checkpoint")
    missing = [k for k in ("mean", "std") if k not in ckpt.metadata]
    if missing:
        raise ZooError(f"weights {str(ckpt.path)!r} have no zoo.{'/zoo.'.join(missing)} in the header, so the "
                       "input normalisation is unknown; use a checkpoint written by `zoo finetune` or "
                       "zoo.weights.save_checkpoint(..., mean=, std=)")
    model = load_checkpoint(ckpt)
    model.eval()
    num_classes = model.spec.kwargs["num_classes"]  # validated by the registry when the model was built
    classes = ckpt.metadata.get("classes")
    if classes is None:
        classes = [str(i) for i in range(num_classes)]
    if len(classes) != num_classes:  # load_checkpoint checks this too; the model's head decides
        raise ZooError(f"weights {str(ckpt.path)!r}: zoo.classes names {len(classes)} classes for a model with "
                       f"{num_classes} outputs")
    meta = dict(ckpt.metadata, spec=ckpt.spec)
    size = _input_size(model, meta, ckpt.path)
    mean, std = tuple(float(v) for v in ckpt.metadata["mean"]), tuple(float(v) for v in ckpt.metadata["std"])
    if len(mean) != size[0] or len(std) != size[0]:
        raise ZooError(f"weights {str(ckpt.path)!r}: mean/std have {len(mean)}/{len(std)} values for "
                       f"{size[0]}-channel input")
    return Classifier(model, [str(c) for c in classes], mean, std, size, ckpt.path)


def predict(weights: str | os.PathLike | Classifier, images: Sequence[str | os.PathLike], top: int = DEFAULT_TOP
            ) -> list[list[tuple[str, float]]]:
    """Top-`top` (class name, probability) pairs for each image file, best first."""
    clf = weights if isinstance(weights, Classifier) else load_classifier(weights)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ZooError(f"top={short_repr(top)} is not allowed; expected int >= 1")
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if not images:
        raise ZooError("no images given to predict")
    for p in images:
        if not os.path.isfile(p):
            raise ZooError(f"image {os.fspath(p)!r} does not exist")
    probs = clf.probabilities(images)
    k = min(top, probs.shape[1])
    vals, idx = probs.topk(k, dim=1)
    return [[(clf.class_names[j], float(v)) for v, j in zip(vr.tolist(), ir.tolist())] for vr, ir in zip(vals, idx)]


def evaluate_folder(weights: str | os.PathLike | Classifier, root: str | os.PathLike, batch_size: int = 256
                    ) -> dict[str, Any]:
    """Top-1/top-5 accuracy (percent) of a checkpoint on a labelled folder root/<class>/<images>.

    Class folders are matched to the checkpoint's class names by name; an unknown class is an error.
    """
    clf = weights if isinstance(weights, Classifier) else load_classifier(weights)
    root = Path(root)
    if not root.is_dir():
        raise ZooError(f"evaluation folder {root} does not exist; expected root/<class>/<images>")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ZooError(f"no class folders in {root}; expected root/<class>/<images>")
    try:
        check_class_paths(root, classes, root)
    except RuntimeError as e:  # a symlink loop
        raise ZooError(f"cannot read the evaluation folder {root}: {e}") from None
    unknown = [c for c in classes if c not in clf.class_names]
    if unknown:
        raise ZooError(f"class folder(s) {', '.join(repr(c) for c in unknown)} in {root} are not among the "
                       f"checkpoint's classes ({', '.join(clf.class_names)})")
    items = []
    for c in classes:
        files = sorted(f for f in (root / c).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        if not files:
            raise ZooError(f"class folder {root / c} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        items += [(f, clf.class_names.index(c)) for f in files]
    c1 = c5 = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        probs = clf.probabilities([f for f, _ in chunk])
        y = torch.tensor([t for _, t in chunk])
        top = probs.topk(min(5, probs.shape[1]), dim=1).indices
        c1 += int((top[:, 0] == y).sum())
        c5 += int((top == y[:, None]).any(dim=1).sum())
    n = len(items)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "images": n, "classes": len(classes)}


def _cmd_predict(args: argparse.Namespace) -> int:
    if args.folder is not None:
        if args.images:
            raise ZooError("give either image files or --folder, not both")
        m = evaluate_folder(args.weights, args.folder)
        if args.json:
            print(json.dumps(m, indent=2))
        else:
            print(f"{args.folder}: top1 {m['top1']:.2f}%  top5 {m['top5']:.2f}%  ({m['images']} images, "
                  f"{m['classes']} classes)")
        return 0
    if not args.images:
        raise ZooError("no images given; pass image files, or --folder DIR to score a labelled folder")
    results = predict(args.weights, args.images, top=args.top)
    if args.json:
        print(json.dumps([{"image": str(p), "top": [{"class": c, "prob": round(v, 6)} for c, v in r]}
                          for p, r in zip(args.images, results)], indent=2))
        return 0
    for p, r in zip(args.images, results):
        print(p)
        w = max(len(c) for c, _ in r)
        for c, v in r:
            print(f"  {c.ljust(w)}  {v:.4f}")
    return 0


def add_commands(sub: Any) -> None:
    """Add `zoo predict` to the zoo CLI."""
    p = sub.add_parser("predict", help="classify images with a fine-tuned checkpoint (top-5 classes)",
                       description="Rebuild the model from a safetensors checkpoint's header (spec, class names, "
                                   "mean/std) and print the top classes with their probabilities for each image.")
    p.add_argument("--weights", required=True, help="checkpoint written by `zoo finetune` (OUT/model.safetensors)")
    p.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...; any mode and size)")
    p.add_argument("--folder", default=None,
                   help="instead of images: a labelled folder root/<class>/<images>; prints top-1/top-5 accuracy")
    p.add_argument("--top", type=int, default=DEFAULT_TOP, help=f"how many classes to show (default {DEFAULT_TOP})")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_predict)
