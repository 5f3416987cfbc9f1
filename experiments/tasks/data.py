"""Input pipelines shared by the tasks: tfds data sources read through grain.

Every dataset is prepared once by tfds in ARRAY_RECORD format (no TensorFlow needed) and read
back as a random-access data source. Training batches come from a seeded grain pipeline
(`shuffle -> repeat -> batch`) whose iterator position is a small JSON-able dict, so a run resumes
on the exact batch it stopped at. Evaluation passes cover every example once, in a fixed order,
with the last batch padded to the full batch size.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from jaxckpt.errors import ConfigError
from jaxckpt.types import Batch

DATA_DIR_ENV = "JAXCKPT_DATA_DIR"
"""Environment variable naming the tfds data directory when `config.data.data_dir` is None."""

DEFAULT_DATA_DIR = os.path.join("~", ".cache", "jaxckpt", "tfds")
"""Where datasets are prepared when neither the config nor `$JAXCKPT_DATA_DIR` names a place."""

Example = Mapping[str, Any]
Transform = Callable[[Example], dict[str, np.ndarray]]


class RandomAccessSource(Protocol):
    """What grain reads from: a length and records by integer index (tfds data sources qualify)."""

    def __len__(self) -> int:
        ...

    def __getitem__(self, index: int) -> Example:
        ...


def resolve_data_dir(data_dir: str | None) -> str:
    """Returns the absolute tfds data directory to use.

    Args:
        data_dir: `config.data.data_dir`; None falls back to `$JAXCKPT_DATA_DIR`, then to
            `~/.cache/jaxckpt/tfds`.

    Returns:
        An absolute, user-expanded path (not created here).

    Example:
        >>> resolve_data_dir("/tmp/tfds")
        '/tmp/tfds'
    """
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return os.path.abspath(os.path.expanduser(chosen))


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Holds an exclusive advisory lock on `path` (created if missing) for the block."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(make_builder: Callable[[str], tfds.core.DatasetBuilder], data_dir: str) -> tfds.core.DatasetBuilder:
    """Builds and prepares a tfds dataset in ARRAY_RECORD format, safely across processes.

    tfds writes into a uniquely named temporary folder and renames it at the end, but two processes
    preparing at once would both write and the second rename would fail. A file lock in `data_dir`
    serialises them; the builder is constructed under the lock so that a process that waited reads
    the dataset info the other one wrote. Preparing an already prepared dataset only reads metadata.

    Args:
        make_builder: called with `data_dir`; returns the (unprepared) builder.
        data_dir: the tfds data directory (created if missing).

    Returns:
        The prepared builder, ready for `as_data_source`.

    Example:
        >>> builder = prepare(lambda d: tfds.builder("imdb_reviews/plain_text", data_dir=d), "/tmp/tfds")
    """
    os.makedirs(data_dir, exist_ok=True)
    with _file_lock(os.path.join(data_dir, ".jaxckpt_prepare.lock")):
        builder = make_builder(data_dir)
        builder.download_and_prepare(file_format=tfds.core.FileFormat.ARRAY_RECORD)
    return builder


def split_indices(num_examples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits `range(num_examples)` into a kept part and a held-out part, fixed by `seed`.

    Args:
        num_examples: size of the split being divided.
        fraction: share held out, strictly between 0 and 1 (rounded to whole examples, at least one
            on each side).
        seed: seed of the permutation; keep it fixed so the held-out set never changes between runs.

    Returns:
        `(kept, held_out)`: sorted int64 index arrays, disjoint, together covering every index.

    Raises:
        ValueError: if `fraction` is not in (0, 1) or leaves one side empty.

    Example:
        >>> kept, held_out = split_indices(10, 0.2, seed=0)
        >>> len(kept), len(held_out)
        (8, 2)
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"Held-out fraction must be strictly between 0 and 1, got {fraction}.")
    num_held_out = int(round(fraction * num_examples))
    if not 0 < num_held_out < num_examples:
        raise ConfigError(
                f"Holding out {fraction} of {num_examples} examples leaves {num_held_out} held out and "
                f"{num_examples - num_held_out} kept; choose a fraction that keeps both non-empty."
        )
    order = np.random.default_rng(seed).permutation(num_examples)
    return np.sort(order[num_held_out:]).astype(np.int64), np.sort(order[:num_held_out]).astype(np.int64)


class Subset:
    """A random-access view of some records of another source, in the order of `indices`.

    Example:
        >>> view = Subset(["a", "b", "c"], np.array([2, 0]))
        >>> len(view), view[0]
        (2, 'c')
    """

    def __init__(self, source: RandomAccessSource, indices: Sequence[int]):
        self._source = source
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Example:
        return self._source[int(self.indices[index])]

    def __repr__(self) -> str:
        return f"Subset({self._source!r}, {len(self)} records)"


class ArraySource:
    """In-memory records: a dict of equally long numpy arrays, read one row at a time.

    Used where a dataset is small enough to read from its tfds data source once and keep in
    memory, which halves the cost of every training batch.

    Example:
        >>> source = ArraySource({"x": np.arange(3), "y": np.arange(3) * 2})
        >>> source[1]
        {'x': 1, 'y': 2}
    """

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        lengths = {key: len(value) for key, value in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"ArraySource needs arrays of one length, got lengths {lengths}.")
        self.arrays = dict(arrays)
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Example:
        return {key: value[index] for key, value in self.arrays.items()}

    def __repr__(self) -> str:
        return f"ArraySource(keys={sorted(self.arrays)}, {self._length} records)"


def train_iterator(
        source: RandomAccessSource,
        batch_size: int,
        seed: int,
        transform: Transform,
        read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """An endless iterator of shuffled training batches with a checkpointable position.

    Each epoch is a different permutation derived from `seed` and the epoch number; batches never
    straddle a short remainder (`drop_remainder=True`), so every batch has one shape.

    Args:
        source: the training records.
        batch_size: examples per batch; at most `len(source)`.
        seed: shuffle seed; the same seed gives the same sequence of batches.
        transform: turns one record into a dict of numpy features (decoding, label mapping).
        read_options: grain read threads and prefetch; None uses two threads.

    Returns:
        A grain `DatasetIterator`; `get_state()` returns a JSON-able dict and `set_state(state)`
        continues from exactly that batch.

    Raises:
        ValueError: if `batch_size` is not in [1, len(source)].

    Example:
        >>> it = train_iterator(ArraySource({"x": np.arange(8)}), 4, seed=0, transform=dict)
        >>> next(it)["x"].shape
        (4,)
    """
    if not 1 <= batch_size <= len(source):
        raise ConfigError(
                f"batch_size={batch_size} must be between 1 and the number of training examples "
                f"({len(source)}); lower the batch size."
        )
    if read_options is None:
        read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4 * batch_size)
    dataset = (
            grain.MapDataset.source(source)
            .shuffle(seed=seed)
            .repeat()
            .map(transform)
            .batch(batch_size, drop_remainder=True)
    )
    return iter(dataset.to_iter_dataset(read_options))


def _pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pads every array of a short batch with zero rows (ids with -1) up to `batch_size`."""
    num_real = len(batch["id"])
    padded = {}
    for key, value in batch.items():
        pad = np.zeros((batch_size - num_real, *value.shape[1:]), dtype=value.dtype)
        if key == "id":
            pad -= 1
        padded[key] = np.concatenate([value, pad])
    return padded


def eval_batches(
        source: RandomAccessSource,
        ids: Sequence[int],
        batch_size: int,
        transform: Transform,
) -> Iterator[Batch]:
    """One pass over `source` in order, in batches of exactly `batch_size` rows.

    Args:
        source: the records of the split.
        ids: int example ids aligned with `source` (`ids[i]` names record `i`).
        batch_size: rows per batch; the last batch is padded with zero rows.
        transform: turns one record into a dict of numpy features.

    Yields:
        Dicts with the transformed features plus `"id"` (int64, -1 on padding rows) and `"mask"`
        (float32, 1 for real rows, 0 for padding). Every example appears exactly once.

    Raises:
        ValueError: if `ids` does not have one entry per record, or `batch_size` < 1.

    Example:
        >>> batches = list(eval_batches(ArraySource({"x": np.arange(3)}), [7, 8, 9], 2, dict))
        >>> batches[1]["mask"].tolist(), batches[1]["id"].tolist()
        ([1.0, 0.0], [9, -1])
    """
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) != len(source):
        raise ValueError(f"Got {len(ids)} ids for a source of {len(source)} records; pass one id per record.")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}.")

    def with_id(index: int, record: Example) -> dict[str, np.ndarray]:
        features = dict(transform(record))
        features["id"] = ids[index]
        features["mask"] = np.float32(1.0)
        return features

    dataset = grain.MapDataset.source(source).map_with_index(with_id).batch(batch_size)
    for batch in dataset:
        yield _pad_batch(batch, batch_size)
