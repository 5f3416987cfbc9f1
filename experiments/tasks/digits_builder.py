"""The UCI handwritten digits (shipped inside scikit-learn) as a tfds dataset.

1797 grey-scale 8x8 images of the digits 0-9, with pixel values 0..16. The data come from
`sklearn.datasets.load_digits`, so preparing needs no network and no TensorFlow: tfds writes
ARRAY_RECORD files that `builder.as_data_source()` reads back.

Splits are fixed by a constant seed: `test` holds 20% of the examples, `train` the rest. Every
example carries `id`, its row index in scikit-learn's array, so predictions can be traced back.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from experiments.tasks import data

NUM_EXAMPLES = 1797
TEST_FRACTION = 0.2
_SPLIT_SEED = 0  # Fixed forever: changing it would silently change the test set.


class JaxckptDigits(tfds.core.GeneratorBasedBuilder):
    """tfds builder `jaxckpt_digits`: UCI digits with fixed `train` and `test` splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "UCI digits from scikit-learn; 20% test split fixed by seed 0."}

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo is built directly: `dataset_info_from_configs` looks for metadata files
        # (README, citations) next to the module, which an application module does not ship.
        return tfds.core.DatasetInfo(
                builder=self,
                description="UCI ML hand-written digits (8x8, values 0..16), as shipped by scikit-learn.",
                features=tfds.features.FeaturesDict({
                        "image": tfds.features.Tensor(shape=(8, 8), dtype=np.uint8),
                        "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                        "id": tfds.features.Scalar(dtype=np.int64),
                }),
                supervised_keys=("image", "label"),
                homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download: the data ship with scikit-learn.
        train_ids, test_ids = data.split_indices(NUM_EXAMPLES, TEST_FRACTION, seed=_SPLIT_SEED)
        return {
                "train": self._generate_examples(train_ids),
                "test": self._generate_examples(test_ids),
        }

    def _generate_examples(self, ids: np.ndarray):
        from sklearn.datasets import load_digits  # Imported here: only preparation needs it.

        digits = load_digits()
        if len(digits.target) != NUM_EXAMPLES:
            raise ValueError(
                    f"scikit-learn returned {len(digits.target)} digits, expected {NUM_EXAMPLES}; "
                    "the fixed splits assume the standard UCI copy."
            )
        for i in ids:
            yield int(i), {
                    "image": digits.images[i].astype(np.uint8),
                    "label": int(digits.target[i]),
                    "id": int(i),
            }


def prepare(data_dir: str) -> JaxckptDigits:
    """Prepares `jaxckpt_digits` under `data_dir` (once; later calls only read metadata).

    Args:
        data_dir: the tfds data directory; safe to share between concurrent processes.

    Returns:
        The prepared builder; `builder.as_data_source()` gives the `train` and `test` sources.

    Example:
        >>> sources = prepare("/tmp/tfds").as_data_source()
        >>> len(sources["test"])
        359
    """
    return data.prepare(lambda d: JaxckptDigits(data_dir=d, file_format="array_record"), data_dir)
