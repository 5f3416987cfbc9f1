"""A deterministic word tokenizer with a frequency vocabulary, stored with the run as a list.

Text is lowercased, HTML line breaks (IMDB reviews contain `<br />`) become spaces, and words are
runs of letters/digits, optionally with one inner apostrophe (`don't`). The vocabulary is
`["<pad>", "<unk>"]` followed by the most frequent training words, ties broken alphabetically,
so the same texts always give the same list, and the list alone rebuilds the tokenizer.
"""

from __future__ import annotations

import collections
import re
from typing import Iterable, Sequence

import numpy as np

from jaxckpt.errors import ConfigError

PAD = "<pad>"
UNK = "<unk>"
PAD_ID = 0
UNK_ID = 1

_TAG = re.compile(r"<[^>]*>")
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


def words(text: str | bytes) -> list[str]:
    """Splits `text` into lowercase words.

    Args:
        text: a string, or UTF-8 bytes (what tfds data sources return for text features).

    Returns:
        The words in order.

    Example:
        >>> words("I didn't like it.<br />2/10")
        ['i', "didn't", 'like', 'it', '2', '10']
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return _WORD.findall(_TAG.sub(" ", text).lower())


def build_vocab(texts: Iterable[str | bytes], vocab_size: int) -> list[str]:
    """The `vocab_size` most frequent words of `texts` after `<pad>` and `<unk>`.

    Args:
        texts: the training texts.
        vocab_size: how many words to keep (fewer if the texts have fewer distinct words).

    Returns:
        `[PAD, UNK, most frequent word, ...]`; equal counts are ordered alphabetically.

    Raises:
        ValueError: if `vocab_size` < 1.

    Example:
        >>> build_vocab(["b a b", "c a"], vocab_size=2)
        ['<pad>', '<unk>', 'a', 'b']
    """
    if vocab_size < 1:
        raise ConfigError(f"vocab_size must be positive, got {vocab_size}.")
    counts = collections.Counter()
    for text in texts:
        counts.update(words(text))
    counts.pop(PAD, None)
    counts.pop(UNK, None)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [PAD, UNK] + [word for word, _ in ranked[:vocab_size]]


class Tokenizer:
    """Maps text to a fixed-length int32 array of vocabulary ids (`<unk>` for unknown words).

    Example:
        >>> tokenizer = Tokenizer(["<pad>", "<unk>", "good", "film"])
        >>> tokenizer.encode("Good film, good cast", max_length=6).tolist()
        [2, 3, 2, 1, 0, 0]
    """

    def __init__(self, vocab: Sequence[str]):
        """Creates the tokenizer.

        Args:
            vocab: the vocabulary list, as `build_vocab` returns it (or as saved with a run).

        Raises:
            ValueError: if the list does not start with `<pad>`, `<unk>` or repeats a word.
        """
        vocab = list(vocab)
        if vocab[:2] != [PAD, UNK]:
            raise ValueError(f"A vocabulary must start with {[PAD, UNK]}, got {vocab[:2]}.")
        if len(set(vocab)) != len(vocab):
            repeated = sorted(w for w, n in collections.Counter(vocab).items() if n > 1)
            raise ValueError(f"The vocabulary repeats {repeated[:5]}; every word must appear once.")
        self.vocab = vocab
        self._ids = {word: i for i, word in enumerate(vocab)}

    def encode(self, text: str | bytes, max_length: int) -> np.ndarray:
        """Word ids of `text`, truncated or padded with `PAD_ID` to `max_length`."""
        ids = [self._ids.get(word, UNK_ID) for word in words(text)[:max_length]]
        out = np.full((max_length,), PAD_ID, dtype=np.int32)
        out[:len(ids)] = ids
        return out
