"""Write a small CIFAR-10 (Krizhevsky 2009) image folder of the kind users bring to `zoo finetune`:
`OUT/train/<class>/*.jpg` and `OUT/val/<class>/*.jpg`, N images per class from the JPEG q75 copy's
training split and M per class from its test split, chosen by a seeded shuffle. The JPEG bytes are
written as they are stored (no re-encoding). The folder is derived from ../shared/data/cifar10, so it
goes under runs/ (git-ignored) and is never committed.

    .venv/bin/python benchmarks/make_cifar10_folder.py runs/cifar10_folder [--train 100] [--val 100]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from zoo.data.sources import data_root


def write_split(npz: Path, out: Path, per_class: int, seed: int) -> int:
    """Copy `per_class` JPEGs of every class of one .npz split into out/<class>/; return how many."""
    with np.load(npz, allow_pickle=False) as d:
        jpeg, offsets, labels, classes = d["jpeg"], d["offsets"], d["labels"], [str(c) for c in d["classes"]]
    rng = np.random.default_rng(seed)
    n = 0
    for c, name in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise SystemExit(f"{npz}: class {name!r} has {len(idx)} images, fewer than {per_class}")
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in sorted(rng.permutation(idx)[:per_class]):
            (folder / f"{i:05d}.jpg").write_bytes(jpeg[offsets[i]:offsets[i + 1]].tobytes())
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    """Build the folder (replacing an old one)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="folder to write, e.g. runs/cifar10_folder")
    ap.add_argument("--train", type=int, default=100, help="images per class from the training split")
    ap.add_argument("--val", type=int, default=100, help="images per class from the test split")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    src = data_root() / "cifar10"
    if not (src / "train.npz").is_file():
        print(f"no CIFAR-10 JPEG copy in {src}", file=sys.stderr)
        return 2
    if args.out.exists():
        shutil.rmtree(args.out)
    n_train = write_split(src / "train.npz", args.out / "train", args.train, args.seed)
    n_val = write_split(src / "test.npz", args.out / "val", args.val, args.seed + 1)
    print(f"wrote {n_train} training and {n_val} validation JPEGs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
