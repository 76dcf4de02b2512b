"""The weights index: `weights/index.json` lists every committed checkpoint with its provenance.

Each entry gives the tag, architecture and kwargs, dataset, metrics, compression, sha256, file, the
URL the file is published at (null: it ships with the weights folder) and the recipe that produced it.
The folder is the one installed with zoo (the repository's `weights/`, shipped as the package data
`zoo._weights`) unless `ZOO_WEIGHTS_DIR` (or a `weights_dir` argument) points elsewhere. A file missing
from the folder is downloaded from $ZOO_WEIGHTS_URL (or the entry's URL) into the cache (zoo.weights.hub)
and checked against its sha256.
"""

from __future__ import annotations

import fnmatch
import importlib.resources
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from zoo.errors import ZooError
from zoo.untrusted import parse_json, read_text, short_repr
from zoo.weights.checkpoint import describe_spec, load_checkpoint, read_checkpoint, sha256_file
from zoo.weights.hub import URL_ENV, cache_dir, check_sha256, check_url, download_url, fetch

INDEX_FILE = "index.json"
INDEX_FORMAT = 1
PACKAGE = "zoo._weights"  # the repository's weights/ folder, installed as package data (pyproject.toml)
MAX_TOTAL_MB = 20.0  # all committed checkpoints together stay under this
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
# field -> (types, what is allowed) of one index entry; `compression` is any JSON value
_ENTRY_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "tag": ((str,), "a tag string"), "architecture": ((str,), "a model name"), "kwargs": ((dict,), "an object"),
    "dataset": ((str,), "a string"), "metrics": ((dict,), "an object"), "sha256": ((str,), "64 hex digits"),
    "file": ((str,), "a file name inside the weights folder"), "size_bytes": ((int,), "an int"),
    "recipe": ((str,), "a string"), "classes": ((list, type(None)), "a list of strings or null"),
    "url": ((str, type(None)), "an https, http or file URL, or null"),
}


@dataclass(frozen=True)
class WeightsEntry:
    """One checkpoint listed in the index."""

    tag: str
    architecture: str
    kwargs: dict[str, Any]
    dataset: str
    metrics: dict[str, float]
    sha256: str
    file: str  # relative to the weights folder
    size_bytes: int
    recipe: str
    url: str | None = None  # where the file is published, for users whose install lacks it
    compression: Any = None  # what was applied: given at registration, else a summary of the header's steps
    classes: list[str] | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        """`architecture.tag`, the name `list_weights` matches against."""
        return f"{self.architecture}.{self.tag}"

    def describe(self) -> str:
        """`architecture(kwargs).tag`."""
        return f"{describe_spec(self.architecture, self.kwargs)}.{self.tag}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as stored in index.json."""
        return asdict(self)


def weights_root(path: str | os.PathLike | None = None) -> Path:
    """The weights folder: `path`, else $ZOO_WEIGHTS_DIR, else the one installed with zoo (`zoo._weights`)."""
    if path is not None:
        return Path(path)
    env = os.environ.get("ZOO_WEIGHTS_DIR")
    if env:
        return Path(env)
    return packaged_root()


def packaged_root() -> Path:
    """The weights folder installed with zoo: the package data `zoo._weights` (the repository's weights/)."""
    try:
        root = importlib.resources.files(PACKAGE)
    except ModuleNotFoundError:
        raise ZooError(f"the weights package {PACKAGE!r} is not installed with this zoo; reinstall zoo "
                       "(`pip install .`, or `pip install -e .` in a checkout) or set $ZOO_WEIGHTS_DIR") from None
    if not isinstance(root, Path):
        raise ZooError(f"the weights package {PACKAGE!r} is inside {str(root)!r}, not a folder on disk; install zoo "
                       "unzipped or set $ZOO_WEIGHTS_DIR to a folder holding index.json")
    return root


def read_index(wdir: str | os.PathLike | None = None) -> list[WeightsEntry]:
    """All entries of the index (empty if the folder or index.json does not exist)."""
    p = weights_root(wdir) / INDEX_FILE
    if not p.exists():
        return []
    data = parse_json(read_text(p, "weights index"), f"weights index {str(p)!r}")
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT or not isinstance(data.get("weights"), list):
        raise ZooError(f"weights index {str(p)!r} is malformed: expected {{'format': {INDEX_FORMAT}, "
                       "'weights': [...]}")
    return [_entry(e, i, p) for i, e in enumerate(data["weights"])]


def _entry(e: Any, i: int, p: Path) -> WeightsEntry:
    """One index entry, every field type-checked and its file name kept inside the weights folder."""
    where = f"weights index {str(p)!r}: entry {i}"
    if not isinstance(e, dict):
        raise ZooError(f"{where} is {short_repr(e)}; expected an object")
    unknown = sorted(set(e) - {f.name for f in fields(WeightsEntry)})
    missing = sorted({f.name for f in fields(WeightsEntry) if f.default is MISSING} - set(e))
    if unknown or missing:
        raise ZooError(f"{where}: unknown fields {short_repr(unknown)}, missing fields {missing}")
    for key, (types, allowed) in _ENTRY_TYPES.items():
        v = e.get(key)
        if key in e and (not isinstance(v, types) or isinstance(v, bool)):
            raise ZooError(f"{where}: {key}={short_repr(v)} is not allowed; expected {allowed}")
    if not _SHA_RE.match(e["sha256"]):
        raise ZooError(f"{where}: sha256={short_repr(e['sha256'])} is not allowed; expected 64 lowercase hex digits")
    check_file_name(e["file"], where)
    if e.get("url") is not None:
        check_url(e["url"], where)
    return WeightsEntry(**e)


def check_file_name(name: str, where: str) -> str:
    """`name` if it is a plain file name (no folder, no '..'), so that it stays inside the weights folder."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute():
        raise ZooError(f"{where}: file={short_repr(name)} is not allowed; expected a plain file name inside the "
                       "weights folder (no folders, no '..')")
    return name


def local_path(entry: WeightsEntry, wdir: str | os.PathLike | None = None) -> Path:
    """The entry's file in the weights folder; ZooError if it resolves anywhere else (e.g. through a symlink)."""
    root = weights_root(wdir)
    path = root / check_file_name(entry.file, f"weights entry {entry.name}")
    if path.resolve().parent != root.resolve():
        raise ZooError(f"weights entry {entry.name}: {str(path)!r} resolves to {str(path.resolve())!r}, outside the "
                       f"weights folder {str(root)!r}; index files must live in that folder")
    return path


def entry_path(entry: WeightsEntry, wdir: str | os.PathLike | None = None) -> Path:
    """The entry's checkpoint: its file in the weights folder, else the cached download of its url."""
    path = local_path(entry, wdir)
    if path.is_file():
        return path
    url = download_url(entry.file, entry.url)
    if url is None and not (cache_dir() / entry.file).is_file():
        raise ZooError(f"weights entry {entry.describe()}: file {entry.file!r} is missing from {str(path.parent)!r}; "
                       f"{how_to_get(entry.file)}")
    return fetch(url, entry.file, entry.sha256)


def how_to_get(file: str) -> str:
    """How to get a missing weights file: it ships with zoo, or comes from a folder or base URL the user sets."""
    return (f"zoo's weights ship with the package (reinstall zoo: `pip install .`), or set $ZOO_WEIGHTS_DIR to a "
            f"folder holding {file!r} and its index.json, or set ${URL_ENV} to a base URL serving {file!r} (downloaded "
            f"once into {str(cache_dir())!r} and checked against the index's sha256)")


def write_index(entries: list[WeightsEntry], wdir: str | os.PathLike | None = None) -> Path:
    """Write the index atomically, entries sorted by architecture, tag and file."""
    d = weights_root(wdir)
    d.mkdir(parents=True, exist_ok=True)
    entries = sorted(entries, key=lambda e: (e.architecture, e.tag, e.file))
    text = json.dumps({"format": INDEX_FORMAT, "weights": [e.to_dict() for e in entries]}, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, d / INDEX_FILE)
    return d / INDEX_FILE


def list_weights(pattern: str = "*", weights_dir: str | os.PathLike | None = None) -> list[WeightsEntry]:
    """Index entries whose `architecture.tag` or tag matches an fnmatch pattern."""
    return [e for e in read_index(weights_dir)
            if fnmatch.fnmatch(e.name, pattern) or fnmatch.fnmatch(e.tag, pattern)]


def weights_for(model_name: str, weights_dir: str | os.PathLike | None = None) -> list[WeightsEntry]:
    """Index entries for one registered model (for `zoo info`)."""
    return [e for e in read_index(weights_dir) if e.architecture == model_name]


def find_entry(name: str, tag: str, kwargs: dict[str, Any],
               wdir: str | os.PathLike | None = None) -> WeightsEntry:
    """The entry for `name` with `tag` whose kwargs agree with the ones given, or a ZooError saying why not."""
    entries = weights_for(name, wdir)
    tagged = [e for e in entries if e.tag == tag]
    if not tagged:
        have = sorted({e.tag for e in entries})
        hint = ("available tags: " + ", ".join(have)) if have else "the index has no weights for it"
        raise ZooError(f"{name}: no weights tagged {tag!r} in {str(weights_root(wdir) / INDEX_FILE)!r}; {hint}")
    fits = [e for e in tagged if all(e.kwargs.get(k) == v for k, v in kwargs.items() if k != "resolution")]
    if len(fits) == 1:
        return fits[0]
    options = "; ".join(e.describe() for e in tagged)
    given = ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items())) or "no kwargs"
    if not fits:
        if "num_classes" in kwargs and any(e.kwargs.get("num_classes") != kwargs["num_classes"] for e in tagged):
            others = {k: v for k, v in kwargs.items() if k != "num_classes"}
            if [e for e in tagged if all(e.kwargs.get(k) == v for k, v in others.items() if k != "resolution")]:
                n = tagged[0].kwargs.get("num_classes")
                raise ZooError(f"{name}: num_classes={kwargs['num_classes']} differs from the {n} classes of the "
                               f"{tag!r} weights; pass reinit_head=True to load them with a freshly initialised "
                               f"head, or leave num_classes out to keep the checkpoint's classes")
        raise ZooError(f"{name}: the {tag!r} weights do not exist for {given}; available: {options}")
    raise ZooError(f"{name}: several {tag!r} weights fit {given}; pick one with its kwargs: {options}")


def _metrics(metrics: Any) -> dict[str, float]:
    if not isinstance(metrics, dict) or not metrics:
        raise ZooError(f"metrics={metrics!r} is not allowed; expected a non-empty dict of name -> number")
    out = {}
    for k, v in metrics.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ZooError(f"metrics entry {k!r}: {v!r} is not allowed; expected a finite number")
        out[k] = float(v)
    return out


def summarize_compression(spec: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The header's compression steps without their per-layer details, e.g. [{"kind": "int8", ...}]."""
    steps = spec.get("compression")
    if not steps:
        return None
    if not isinstance(steps, list):
        return steps
    return [{k: v for k, v in step.items() if isinstance(v, (str, int, float, bool)) or v is None}
            if isinstance(step, dict) else step for step in steps]


def register_checkpoint(path: str | os.PathLike, tag: str, dataset: str, metrics: dict[str, float], recipe: str,
                        compression: Any = None, *, weights_dir: str | os.PathLike | None = None,
                        replace: bool = False, max_total_mb: float = MAX_TOTAL_MB,
                        url: str | None = None) -> WeightsEntry:
    """Copy a checkpoint into the weights folder, hash it and add (or with `replace`, update) its index entry;
    `url` is where the file is published, if anywhere (None: the file ships with the weights folder)."""
    if not isinstance(tag, str) or not _TAG_RE.match(tag):
        raise ZooError(f"tag={tag!r} is not allowed; expected letters, digits, '_', '.' or '-'")
    for label, val in (("dataset", dataset), ("recipe", recipe)):
        if not isinstance(val, str) or not val.strip():
            raise ZooError(f"{label}={val!r} is not allowed; expected a non-empty string")
    metrics = _metrics(metrics)
    ckpt = read_checkpoint(path)
    if ckpt.spec is None:
        raise ZooError(f"{str(ckpt.path)!r} has no zoo.spec header; save it with zoo.weights.save_checkpoint")
    if compression is not None and not isinstance(compression, (dict, list, str)):
        raise ZooError(f"compression={compression!r} is not allowed; expected a JSON-able dict, list or string")
    if url is not None and not isinstance(url, str):
        raise ZooError(f"url={url!r} is not allowed; expected a URL string")
    if url is not None:
        check_url(url, f"weights file {ckpt.path.name!r}")
    model = load_checkpoint(ckpt)  # verifies the file really loads
    d = weights_root(weights_dir)
    d.mkdir(parents=True, exist_ok=True)
    dest = d / ckpt.path.name
    digest = sha256_file(ckpt.path)
    entries = read_index(d)
    same = [e for e in entries if e.architecture == model.spec.name and e.tag == tag and e.kwargs == model.spec.kwargs]
    if same and not replace:
        raise ZooError(f"{same[0].describe()} is already in the index; pass replace=True (--replace) to update it")
    others = [e for e in entries if e not in same]
    if any(e.file == dest.name for e in others):
        raise ZooError(f"{dest.name!r} is already used by another index entry; rename the file")
    total = sum(e.size_bytes for e in others) + ckpt.path.stat().st_size
    if total > max_total_mb * 1e6:
        raise ZooError(f"adding {dest.name!r} would make the weights {total / 1e6:.1f} MB, over the "
                       f"{max_total_mb:g} MB budget")
    if dest.resolve() != ckpt.path.resolve():
        if dest.exists() and sha256_file(dest) != digest and not replace:
            raise ZooError(f"{str(dest)!r} exists with different contents; pass replace=True to overwrite it")
        shutil.copyfile(ckpt.path, dest)
    entry = WeightsEntry(
        tag=tag, architecture=model.spec.name, kwargs=dict(model.spec.kwargs), dataset=dataset, metrics=metrics,
        sha256=digest, file=dest.name, size_bytes=dest.stat().st_size, recipe=recipe, url=url,
        compression=compression if compression is not None else summarize_compression(ckpt.spec),
        classes=ckpt.metadata.get("classes"),
    )
    write_index(others + [entry], d)
    return entry


def verify_index(weights_dir: str | os.PathLike | None = None) -> list[str]:
    """Problems found re-hashing every indexed file, in the weights folder or else in the download cache
    (an empty list means all files are intact); nothing is downloaded."""
    d = weights_root(weights_dir)
    problems = []
    for e in read_index(d):
        try:
            p = local_path(e, d)
        except ZooError as err:
            problems.append(str(err))
            continue
        if not p.is_file() and (cache_dir() / e.file).is_file():
            p = cache_dir() / e.file
        if not p.is_file():
            problems.append(f"{e.describe()}: file {e.file!r} is missing from {str(d)!r} and not downloaded to "
                            f"{str(cache_dir())!r}; {how_to_get(e.file)}")
            continue
        try:
            check_sha256(p, e.sha256, f"{e.describe()}: {str(p)!r}", "the file does not match the index")
        except ZooError as err:
            problems.append(str(err))
    return problems
