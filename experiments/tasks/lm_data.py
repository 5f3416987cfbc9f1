"""A byte-level text corpus every Python install carries: the standard library's own `.py` files.

The corpus is deterministic for a given source tree: every `.py` file under the directory
(default: this interpreter's `sysconfig.get_paths()["stdlib"]`, without `site-packages` and
`dist-packages`, which hold third-party code), sorted by relative POSIX path, is taken in order
until `max_bytes` bytes are reached; the file that crosses the budget is cut. Each file goes to
`train`, `val` or `test` by a hash of its relative path, so a file never moves between splits when
the budget grows. A split is its files' bytes joined by the ASCII file separator byte (0x1C, which
no stdlib source contains), cut into windows of `seq_len + 1` bytes at stride `seq_len`: `inputs`
are the first `seq_len` bytes, `targets` the last `seq_len`, so every byte after the first is
predicted exactly once per pass. The tail shorter than a window is dropped, so all examples have
the same number of tokens and per-example means average exactly.

Different Python patch versions ship slightly different sources; `Corpus.fingerprint()` records
the version and hashes of the file list and the bytes, so a resumed run can tell that it changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import sysconfig
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from experiments.tasks import data
from jaxckpt.errors import ConfigError
from jaxckpt.types import Batch

SPLITS = ("train", "val", "test")
FILE_SEPARATOR = 0x1C
"""Byte placed between files (ASCII "file separator"); it lets the model see where a file starts."""

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})

# The corpus lives in memory, so extra read threads would only contend for the GIL.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def stdlib_dir() -> str:
    """This interpreter's standard-library directory."""
    return sysconfig.get_paths()["stdlib"]


def list_sources(root: str) -> list[str]:
    """Relative POSIX paths of the `.py` files under `root`, sorted, third-party folders left out.

    Args:
        root: the directory to walk.

    Returns:
        Sorted relative paths such as `"json/decoder.py"`; symlinked folders are not followed.

    Raises:
        ValueError: if `root` is not a directory or holds no `.py` file.
    """
    if not os.path.isdir(root):
        raise ConfigError(
                f"Corpus directory {root!r} does not exist; set config.data.source_dir to a folder of .py files."
        )
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _EXCLUDED_DIRS]
        relative = os.path.relpath(folder, root)
        for name in files:
            if name.endswith(".py"):
                path = name if relative == "." else os.path.join(relative, name)
                paths.append(path.replace(os.sep, "/"))
    if not paths:
        raise ConfigError(f"Corpus directory {root!r} holds no .py files; set config.data.source_dir to one that does.")
    return sorted(paths)


def split_of(path: str, val_fraction: float, test_fraction: float) -> str:
    """The split a file belongs to, from a hash of its relative path (stable across runs and machines).

    Example:
        >>> split_of("json/decoder.py", 0.05, 0.05) in SPLITS
        True
    """
    position = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") / 2**64
    if position < val_fraction:
        return "val"
    if position < val_fraction + test_fraction:
        return "test"
    return "train"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The bytes of each split and what they were read from.

    Attributes:
        splits: `{"train"|"val"|"test": uint8 array}`, files joined by `FILE_SEPARATOR`.
        files: the relative paths read, in order (the last one possibly cut).
        num_bytes: source bytes read in total (separators not counted).
        digest: sha256 over every path and the bytes read from it.
    """

    splits: Mapping[str, np.ndarray]
    files: tuple[str, ...]
    num_bytes: int
    digest: str

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able description kept with a run: Python version, file count, hashes, split sizes."""
        return {
                "python_version": platform.python_version(),
                "num_files": len(self.files),
                "num_bytes": self.num_bytes,
                "files_sha256": hashlib.sha256("\n".join(self.files).encode()).hexdigest(),
                "corpus_sha256": self.digest,
                "split_bytes": {name: int(len(b)) for name, b in self.splits.items()},
        }


def read_corpus(root: str, max_bytes: int, val_fraction: float, test_fraction: float) -> Corpus:
    """Reads the first `max_bytes` bytes of the sorted `.py` files under `root` into three splits.

    Args:
        root: directory of sources (see `stdlib_dir`).
        max_bytes: corpus budget in bytes; the file that crosses it is cut.
        val_fraction: expected share of files in `val`.
        test_fraction: expected share of files in `test`.

    Returns:
        The `Corpus`.

    Raises:
        ValueError: if the budget is not positive or the fractions leave no room for training.
    """
    if max_bytes < 1:
        raise ConfigError(f"The corpus budget must be positive, got {max_bytes} bytes; raise config.data.corpus_mb.")
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ConfigError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} must be positive and sum to "
                "less than 1."
        )
    parts = {name: [] for name in SPLITS}
    files, total, digest = [], 0, hashlib.sha256()
    for path in list_sources(root):
        with open(os.path.join(root, path), "rb") as f:
            content = f.read(max_bytes - total)
        files.append(path)
        total += len(content)
        digest.update(path.encode() + b"\0" + len(content).to_bytes(8, "big") + content)
        parts[split_of(path, val_fraction, test_fraction)].append(content)
        if total >= max_bytes:
            break
    separator = bytes([FILE_SEPARATOR])
    splits = {name: np.frombuffer(separator.join(chunks), dtype=np.uint8) for name, chunks in parts.items()}
    return Corpus(splits=splits, files=tuple(files), num_bytes=total, digest=digest.hexdigest())


class Windows:
    """Random-access `{"inputs", "targets"}` windows (int32 `[seq_len]`) over a byte array.

    Example:
        >>> windows = Windows(np.frombuffer(b"abcdefg", np.uint8), seq_len=3)
        >>> len(windows), bytes(windows[1]["targets"].astype(np.uint8))
        (2, b'efg')
    """

    def __init__(self, text: np.ndarray, seq_len: int):
        if seq_len < 1:
            raise ConfigError(f"seq_len must be positive, got {seq_len}.")
        self._text = text
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self._text) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"Window {index} out of range for {len(self)} windows.")
        start = index * self.seq_len
        window = self._text[start:start + self.seq_len + 1].astype(np.int32)
        return {"inputs": window[:-1], "targets": window[1:]}

    def __repr__(self) -> str:
        return f"Windows({len(self._text)} bytes, seq_len={self.seq_len}, {len(self)} windows)"


def train_iterator(windows: Windows, batch_size: int, seed: int) -> grain.DatasetIterator:
    """Endless shuffled batches of windows; `get_state()`/`set_state()` resume exactly."""
    return data.train_iterator(windows, batch_size, seed, dict, _READ_OPTIONS)


def eval_batches(windows: Windows, batch_size: int) -> Iterator[Batch]:
    """One ordered pass over the windows; the id of a window is its index in the split."""
    return data.eval_batches(windows, np.arange(len(windows), dtype=np.int64), batch_size, dict)


def check_sizes(windows: Mapping[str, Windows], splits: Sequence[str]) -> None:
    """Raises a ValueError naming the split if any of `splits` has no complete window."""
    for name in splits:
        if len(windows[name]) == 0:
            raise ConfigError(
                    f"The {name} split of the corpus holds no window of {windows[name].seq_len + 1} bytes; "
                    "raise config.data.corpus_mb or lower config.model.seq_len."
            )
