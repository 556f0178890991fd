"""Where decoded, resized images live between reads: in memory, on disk, or nowhere.

ChestX-ray14 decoded at 224 px is ~22 GB, so keeping every image in memory (`memory`, the
fastest when it fits) is not always possible. `disk` keeps the results of the deterministic
load steps as .npy files keyed by the source file's content and the preprocessing settings,
so they are reused across runs and processes; `none` decodes on every access. Neither of
those keeps arrays in the object, so RSS stays flat with the number of rows, and the object
holds no open files, so DataLoader workers (fork or spawn) can use it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from chestdx.errors import ChestDxError

CACHE_MODES = ("memory", "disk", "none")
_FORMAT = "chestdx-array-cache-v1"  # bump when the entry format changes, so old entries are ignored
_HASH_CHUNK = 1 << 20

# path -> (size, mtime_ns, sha256 digest): a second epoch or a second store does not re-read files
_content_memo: dict[str, tuple[int, int, bytes]] = {}


def default_cache_dir() -> Path:
    """<CHESTDX_HOME>/cache/arrays: next to chestdx's other per-user state."""
    from chestdx.settings import home

    return home() / "cache" / "arrays"


def content_digest(item) -> bytes:
    """sha256 of a file's bytes (str or path-like items), or of repr(item) for anything else.

    Keyed by content rather than by path, so a renamed or copied file reuses its entry and an
    overwritten file (new size or mtime) gets a new one.
    """
    if not isinstance(item, (str, os.PathLike)):
        return hashlib.sha256(repr(item).encode()).digest()
    path = os.fspath(item)
    st = os.stat(path)
    known = _content_memo.get(path)
    if known is not None and known[0] == st.st_size and known[1] == st.st_mtime_ns:
        return known[2]
    digest = _hash_file(path)
    _content_memo[path] = (st.st_size, st.st_mtime_ns, digest)
    return digest


def _hash_file(path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.digest()


def entry_key(digest: bytes, settings_key: str) -> str:
    """Hex name of a cache entry: the same content under other settings never collides."""
    h = hashlib.sha256(_FORMAT.encode())
    h.update(b"\0")
    h.update(digest)
    h.update(b"\0")
    h.update(settings_key.encode())
    return h.hexdigest()


def _check_mode(mode: str) -> str:
    if mode not in CACHE_MODES:
        raise ChestDxError(f"unknown cache mode {mode!r}: expected one of {', '.join(CACHE_MODES)}")
    return mode


class ArrayStore:
    """Indexable store of deterministic load results: store[i] -> np.ndarray (float32) for item i.

    `load(item)` must be deterministic (decode + resize, no augmentation) and `settings_key`
    must name everything it depends on, because disk entries are reused on that promise.
    Arrays returned in `memory` mode are the stored ones: do not modify them in place.
    """

    def __init__(self, items: list, load: Callable[[object], np.ndarray], mode: str = "memory",
                 cache_dir: Path | None = None, settings_key: str = "", progress: bool = False,
                 description: str = "Reading images"):
        self.items = list(items)
        self.load = load
        self.mode = _check_mode(mode)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.settings_key = settings_key
        self._arrays = self._load_all(progress, description) if mode == "memory" else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i) -> np.ndarray:
        i = range(len(self.items))[i]  # IndexError past the end, negative indices as for lists
        if self._arrays is not None:
            return self._arrays[i]
        if self.mode == "disk":
            return self._cached(self.items[i])
        return self._compute(self.items[i])

    def _compute(self, item) -> np.ndarray:
        return np.asarray(self.load(item), dtype=np.float32)

    def _load_all(self, progress: bool, description: str) -> list[np.ndarray]:
        iterator = self.items
        if progress:
            from rich.progress import track

            iterator = track(self.items, description=description, transient=True)
        return [self._compute(item) for item in iterator]

    def entry_path(self, item) -> Path:
        """Where `item`'s disk entry lives: <cache_dir>/<first 2 hex>/<hash>.npy."""
        key = entry_key(content_digest(item), self.settings_key)
        return self.cache_dir / key[:2] / f"{key}.npy"

    def _cached(self, item) -> np.ndarray:
        try:
            path = self.entry_path(item)
        except OSError:
            return self._compute(item)  # unreadable source: let `load` raise its own clear error
        array = _read_entry(path)
        if array is None:
            array = self._compute(item)
            _write_entry(path, array)
        return array


def _read_entry(path: Path) -> np.ndarray | None:
    """The cached array, or None when missing or unusable (truncated, corrupt, wrong dtype)."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError):
        return None  # a half-written or damaged entry is recomputed and rewritten
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        return None
    return array


def _write_entry(path: Path, array: np.ndarray) -> None:
    """Write via a temp file in the same folder and os.replace, so readers never see half a file
    and two processes writing the same entry both succeed (the last rename wins, same bytes)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}-", suffix=".tmp")
    except OSError as err:
        warnings.warn(f"array cache not written ({path.parent}: {err.strerror or err})", stacklevel=3)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if not isinstance(err, OSError):
            raise
        warnings.warn(f"array cache not written ({path}: {err.strerror or err})", stacklevel=3)
