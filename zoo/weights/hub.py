"""Download and cache of indexed weights, the way `torch.hub` does it.

zoo's own weights ship with the package (their index entries have no `url`). Where they were left out, or
for an index of one's own, the user or packager sets a base URL, `$ZOO_WEIGHTS_URL`, that serves the files
by name; an entry may also name its own `url`. A file that is not in the weights folder is downloaded
once from there into the cache, `$ZOO_HOME/weights` (default `~/.cache/zoo/weights`), written atomically
and kept only if its sha256 matches the index. Nothing is downloaded when the file is present locally or
already cached, and zoo names no download location of its own.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from zoo.errors import ZooError
from zoo.weights.checkpoint import sha256_file

URL_ENV = "ZOO_WEIGHTS_URL"  # base URL serving weights files by name, set by the user or packager
URL_SCHEMES = ("https", "http", "file")
TIMEOUT_S = 60.0


def zoo_home() -> Path:
    """zoo's cache folder: $ZOO_HOME, else ~/.cache/zoo."""
    env = os.environ.get("ZOO_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "zoo"


def cache_dir() -> Path:
    """Where downloaded weights are kept: <zoo_home()>/weights."""
    return zoo_home() / "weights"


def base_url() -> str | None:
    """The base URL of $ZOO_WEIGHTS_URL (checked, ending with '/'), or None when it is not set."""
    raw = os.environ.get(URL_ENV, "").strip()
    if not raw:
        return None
    check_url(raw, f"${URL_ENV}")
    return raw if raw.endswith("/") else raw + "/"


def download_url(file: str, url: str | None) -> str | None:
    """Where to download weights file `file` from: $ZOO_WEIGHTS_URL + file when set, else the entry's `url`."""
    base = base_url()
    return base + urllib.parse.quote(file) if base is not None else url


def check_url(url: str, where: str) -> str:
    """`url` if its scheme is one zoo downloads from (https, http, file); ZooError otherwise."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in URL_SCHEMES:
        raise ZooError(f"{where}: url={url!r} is not allowed; expected a URL with scheme "
                       f"{', '.join(URL_SCHEMES)}")
    return url


def check_sha256(path: Path, expected: str, what: str, hint: str) -> Path:
    """`path` if its sha256 is `expected`; else a ZooError naming `what` (the file), both hashes and `hint`."""
    got = sha256_file(path)
    if got != expected:
        raise ZooError(f"{what} has sha256 {got}, but the index expects {expected}; {hint}")
    return path


def fetch(url: str | None, file: str, sha256: str) -> Path:
    """The cached copy of `file`, downloaded from `url` first if it is not cached; both checked against `sha256`."""
    dest = cache_dir() / file
    if dest.is_file():
        return check_sha256(dest, sha256, f"cached weights file {str(dest)!r}", "delete it to download it again")
    if url is None:
        raise ZooError(f"weights file {file!r} is not cached in {str(dest.parent)!r} and no url to download it from "
                       f"is known; set ${URL_ENV} to a base URL serving it")
    return download(url, dest, sha256)


def download(url: str, dest: Path, sha256: str) -> Path:
    """Download `url` to `dest` atomically; the file is kept only if its sha256 is `sha256`."""
    check_url(url, f"weights file {dest.name!r}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
                    shutil.copyfileobj(r, f)
            except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
                raise ZooError(f"cannot download weights file {dest.name!r} from {url!r}: {e}") from None
        check_sha256(tmp, sha256, f"weights file {dest.name!r} downloaded from {url!r}",
                     "the download was not kept; check the url and sha256 in the index")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
