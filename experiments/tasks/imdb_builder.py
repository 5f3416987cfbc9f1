"""Preparing tfds `imdb_reviews` without TensorFlow.

tfds 4.9.10 downloads over HTTP with `requests`, and writes ARRAY_RECORD files without TensorFlow,
but its archive reader opens the downloaded `.tar.gz` with `tf.io.gfile` whenever it is given a
path. `ImdbReviews` is tfds' own builder (same name, configs, version, features, splits and
checksums) whose download manager hands the archive reader an open Python file instead, which
tfds reads with `tarfile` alone. The prepared files are the ones tfds itself would write:
`tfds.data_source("imdb_reviews/plain_text")` reads them.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from typing import Any, BinaryIO, Iterator

import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import extractor
from tensorflow_datasets.datasets.imdb_reviews import imdb_reviews_dataset_builder as tfds_imdb

from experiments.tasks import data
from jaxckpt.errors import UserError

NAME = "imdb_reviews/plain_text"

CONNECT_TIMEOUT_S = 3.0
"""How long to wait for the download host before calling the dataset unavailable offline."""


class DatasetUnavailableError(UserError):
    """The dataset is not prepared and cannot be downloaded (no network); the message says what to do."""


def _reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None if a TCP connection to `url`'s host opens within `timeout` seconds, else why not."""
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                      timeout=timeout):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


class _LocalArchives:
    """A tfds `DownloadManager` whose `iter_archive` opens archives with Python's `open`.

    It also fails fast offline: tfds retries an unreachable host with exponential backoff for about
    two minutes, so `download` first checks that the host answers within `CONNECT_TIMEOUT_S`,
    unless the archive was downloaded already.
    """

    def __init__(self, dl_manager: tfds.download.DownloadManager):
        self._dl_manager = dl_manager

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dl_manager, name)

    def download(self, url: str) -> Any:
        # tfds names a downloaded file after its URL's last path segment (plus a hash).
        stem = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1].split(".", 1)[0]
        downloads = str(self._dl_manager.download_dir)
        cached = any(stem in name for _, _, names in os.walk(downloads) for name in names)
        if not cached and (reason := _reachable(url)):
            data_dir = os.path.dirname(downloads)
            raise DatasetUnavailableError(
                f"IMDB (tfds {NAME}) is not prepared in data.data_dir={data_dir}, and its download host "
                f"{urllib.parse.urlsplit(url).hostname} cannot be reached ({reason}). It needs one run with "
                "internet access (it downloads about 80 MB and prepares it there), or --config.data.data_dir "
                "pointing to a directory where it is prepared.")
        return self._dl_manager.download(url)

    def iter_archive(self, resource: Any) -> Iterator[tuple[str, BinaryIO]]:
        if not isinstance(resource, tfds.download.Resource):
            resource = tfds.download.Resource(path=resource)
        # Opened lazily: the builder creates one generator per split and may never start some.
        with open(resource.path, "rb") as archive:
            yield from extractor.iter_archive(archive, resource.extract_method)


class ImdbReviews(tfds_imdb.Builder, skip_registration=True):
    """tfds' `imdb_reviews` builder, preparable without TensorFlow (see the module docstring)."""

    name = "imdb_reviews"

    @classmethod
    def get_metadata(cls):
        # Description, citation and tags live next to tfds' module, not this one.
        return tfds_imdb.Builder.get_metadata()

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls):
        # tfds' recorded size and sha256 of the archive, so the download is still verified.
        return tfds_imdb.Builder.url_infos

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return super()._split_generators(_LocalArchives(dl_manager))


def prepare(data_dir: str) -> tfds.core.DatasetBuilder:
    """Downloads (once, internet needed) and prepares `imdb_reviews/plain_text` under `data_dir`.

    Args:
        data_dir: the tfds data directory; safe to share between concurrent processes.

    Returns:
        The prepared builder; `builder.as_data_source(split="train")` reads the reviews.

    Example:
        >>> train = prepare("/tmp/tfds").as_data_source(split="train")
        >>> len(train)
        25000
    """
    return data.prepare(lambda d: ImdbReviews(config="plain_text", data_dir=d), data_dir)
