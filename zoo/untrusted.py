"""Reading untrusted input: bounded error messages, JSON and YAML size and nesting limits, and
safetensors files checked before anything is built from them (no pickles, bounded headers, finite
tensors). SECURITY.md describes the threat model; every refusal here is one `ZooError` that names
the file or value and says what is allowed.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from zoo.errors import ZooError

MAX_HEADER_BYTES = 16 * 2**20  # a safetensors JSON header (zoo's largest are ~60 KB)
MAX_JSON_DEPTH = 32  # nesting of one JSON/YAML value (zoo's deepest headers nest 6 levels)
MAX_NODES = 200_000  # containers and scalars of one document, aliases expanded (YAML alias bombs)
MAX_TEXT_BYTES = 4 * 2**20  # a recipe, results.json or weights index read as text
REPR_LIMIT = 80  # characters of a user value quoted in an error message
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".tar")
PICKLE_REASON = (
    "unpickling allows arbitrary code execution, so zoo only loads safetensors; convert it once in a "
    "trusted session with `safetensors.torch.save_file(torch.load(path, weights_only=True), "
    "'model.safetensors')`"
)
NONFINITE_HINT = "pass allow_nonfinite=True to load it anyway"


class _BoundedRepr(reprlib.Repr):
    """reprlib with small limits everywhere, and no decimal conversion of huge ints."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 48, 48, 40
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = self.maxdeque = 6

    def repr_int(self, x: int, level: int) -> str:
        """The int's digits, or only its size when it is huge (str() of a huge int is slow or refused)."""
        if x.bit_length() > 128:
            return f"<int of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_REPR = _BoundedRepr()


def short_repr(value: Any, limit: int = REPR_LIMIT) -> str:
    """repr() of a user value in bounded time and space, cut to `limit` characters."""
    try:
        s = _REPR.repr(value)
    except Exception:  # noqa: BLE001 (a broken __repr__ of a user object must not hide the real error)
        s = f"<{type(value).__name__}>"
    return s if len(s) <= limit else s[: limit - 3] + "..."


def clip(text: str, limit: int = 200) -> str:
    """A message text (e.g. a library's error) cut to `limit` characters, not quoted."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_tree(value: Any, what: str, max_depth: int = MAX_JSON_DEPTH, max_nodes: int = MAX_NODES) -> Any:
    """Return `value` if its nesting and its node count (shared sub-values counted each time) are in bounds."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    nodes = 0
    while stack:
        v, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise ZooError(f"{what}: more than {max_nodes:,} values once aliases are expanded; a document this "
                           "large is refused (a YAML alias bomb expands like this)")
        if isinstance(v, Mapping):
            children: Iterable[Any] = list(v.keys()) + list(v.values())
        elif isinstance(v, (list, tuple)):
            children = v
        else:
            continue
        if depth >= max_depth:
            raise ZooError(f"{what}: values nest deeper than {max_depth} levels, which is not allowed")
        stack.extend((c, depth + 1) for c in children)
    return value


def parse_json(text: str | bytes, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads with bounded nesting; a malformed, too deep or too large document is a ZooError."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ZooError(f"{what}: values nest deeper than {max_depth} levels, which is not allowed") from None
    except ValueError as e:  # JSONDecodeError, and ints over Python's digit limit
        raise ZooError(f"{what} is not valid JSON: {clip(str(e), 160)}") from None
    return check_tree(value, what, max_depth)


_QUOTED_OR_COMMENT = re.compile(r"""'(?:[^']|'')*'|"(?:[^"\\]|\\.)*"|#[^\n]*""")
_BRACKETS = re.compile(r"[\[\]{}]")


def check_flow_depth(text: str, what: str, max_depth: int = MAX_JSON_DEPTH) -> str:
    """`text` unless its brackets (outside quotes and comments) nest deeper than `max_depth`.

    A cheap check before a YAML or JSON parser sees the text: PyYAML takes quadratic time and then
    overflows its stack on thousands of nested flow collections.
    """
    depth = peak = 0
    for b in _BRACKETS.findall(_QUOTED_OR_COMMENT.sub("", text)):
        depth = depth + 1 if b in "[{" else max(depth - 1, 0)
        peak = max(peak, depth)
        if peak > max_depth:
            raise ZooError(f"{what}: values nest deeper than {max_depth} levels, which is not allowed")
    return text


def read_text(path: str | os.PathLike, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a small file, refusing files over `max_bytes` before reading them."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise ZooError(f"{what} {str(p)!r} has {size:,} bytes; at most {max_bytes:,} are allowed")
        return p.read_text(encoding="utf-8")
    except OSError as e:
        raise ZooError(f"cannot read {what} {str(p)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ZooError(f"{what} {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _looks_like_pickle(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _corrupt(p: Path, why: object) -> ZooError:
    return ZooError(f"weights file {str(p)!r} is truncated or corrupt (not a valid safetensors file; its header does not parse or does not match the file's size): "
                    f"{clip(str(why), 200)}")


def check_file(path: str | os.PathLike) -> Path:
    """Return the path if it is an existing safetensors-looking file: no pickle, header size in bounds."""
    if not isinstance(path, (str, os.PathLike)):
        raise ZooError(f"weights path {short_repr(path)} is not allowed; expected a path to a .safetensors file")
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ZooError(f"refusing to load {str(p)!r}: a {p.suffix} file is a pickle, and {PICKLE_REASON}")
    if not p.is_file():
        raise ZooError(f"weights file {str(p)!r} does not exist")
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise ZooError(f"cannot read weights file {str(p)!r}: {e.strerror or e}") from None
    if not _looks_like_safetensors(head, size):
        if _looks_like_pickle(head):
            kind = "a zip archive (torch.save format)" if head[:2] == b"PK" else "a pickle"
            raise ZooError(f"refusing to load {str(p)!r}: it is {kind}, and {PICKLE_REASON}")
        raise _corrupt(p, f"{size} bytes, without a safetensors header")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES:
        raise ZooError(f"weights file {str(p)!r} has a {n:,}-byte header; at most {MAX_HEADER_BYTES:,} bytes "
                       "are allowed")
    return p


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """(zoo.* metadata parsed as bounded JSON, without the prefix; tensor shapes) of a checked file."""
    p = check_file(path)
    try:
        with safe_open(os.fspath(p), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _corrupt(p, e) from None
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        if k.startswith("zoo."):
            meta[k[4:]] = parse_json(v, f"weights file {str(p)!r}: header entry {short_repr(k)}")
    return meta, shapes


def check_spec(spec: Any, where: str) -> dict[str, Any]:
    """The zoo.spec of a header if it has the shape zoo writes: {name: str, kwargs: {str: ...}, compression}."""
    ok = (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("kwargs", {}), dict)
          and all(isinstance(k, str) for k in spec.get("kwargs", {}))
          and isinstance(spec.get("compression") or [], list))
    if not ok:
        raise ZooError(f"{where}: zoo.spec {short_repr(spec)} is not allowed; expected an object with 'name' "
                       "(a string), 'kwargs' (an object) and optionally 'compression' (a list of steps)")
    return spec


def check_finite(tensors: Mapping[str, torch.Tensor], what: str, allow_nonfinite: bool = False) -> None:
    """Raise ZooError if a floating-point tensor holds NaN or inf, unless `allow_nonfinite`."""
    if allow_nonfinite:
        return
    for k, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ZooError(f"{what}: tensor {short_repr(k)} holds {bad} NaN/inf value(s) of {t.numel()}; "
                               f"non-finite weights or statistics are refused ({NONFINITE_HINT})")


def load_tensors(path: str | os.PathLike, allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checked safetensors file on the CPU; NaN/inf refused unless `allow_nonfinite`."""
    p = check_file(path)
    try:
        tensors = load_file(os.fspath(p), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _corrupt(p, e) from None
    check_finite(tensors, f"weights file {str(p)!r}", allow_nonfinite)
    return tensors


def check_flag(name: str, value: Any) -> bool:
    """`value` if it is a bool, else a ZooError naming the keyword."""
    if not isinstance(value, bool):
        raise ZooError(f"{name}={short_repr(value)} is not allowed; expected True or False")
    return value
