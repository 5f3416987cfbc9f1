"""Flax models of the tasks, all shaped `encoder -> fusion -> head`.

The top-level parameter names are the contract that grafting relies on: `encoder` holds the
input-specific layers (for text, the embedding too), `fusion` the shared MLP whose widths
`config.model.fusion_dims` sets, and `head` the final Dense over the classes. Changing the fusion
widths changes only `fusion` and `head`'s input size; changing the number of classes changes only
`head`, so a pretrained `encoder` always grafts (`mapping={"encoder": "encoder"}`; `checkpoint.mapping=encoder:encoder` in a config).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxckpt.errors import ConfigError


class MLP(nn.Module):
    """Dense layers of the given widths, each followed by relu and (optionally) dropout.

    Attributes:
        features: output width of each layer, in order (`Dense_0`, `Dense_1`, ...).
        dropout: dropout rate after each activation; 0 disables it.

    Example:
        >>> mlp = MLP((32, 16), dropout=0.1)
        >>> params = mlp.init(jax.random.key(0), jnp.ones((2, 8)), deterministic=True)["params"]
        >>> sorted(params)
        ['Dense_0', 'Dense_1']
    """

    features: Sequence[int]
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        for width in self.features:
            x = nn.relu(nn.Dense(width)(x))
            if self.dropout > 0.0:
                x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        return x


class DigitsClassifier(nn.Module):
    """Classifies 8x8 digit images: flattened pixels -> `encoder` -> `fusion` -> `head` logits.

    Attributes:
        encoder_dims: widths of the encoder MLP over the 64 pixels.
        fusion_dims: widths of the fusion MLP (with dropout).
        num_classes: logits per example.
        dropout: dropout rate inside the fusion MLP.

    Example:
        >>> model = DigitsClassifier((32,), (16,), num_classes=10)
        >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8)))["params"]
        >>> sorted(params)
        ['encoder', 'fusion', 'head']
    """

    encoder_dims: Sequence[int]
    fusion_dims: Sequence[int]
    num_classes: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        x = images.reshape((images.shape[0], -1))
        x = MLP(self.encoder_dims, name="encoder")(x, deterministic)
        x = MLP(self.fusion_dims, self.dropout, name="fusion")(x, deterministic)
        return nn.Dense(self.num_classes, name="head")(x)


class TextEncoder(nn.Module):
    """Embeds token ids, averages over the non-padding tokens, then applies an MLP.

    Attributes:
        vocab_size: rows of the embedding table (the vocabulary including `<pad>` and `<unk>`).
        embed_dim: embedding width.
        encoder_dims: widths of the MLP after pooling (may be empty).
        pad_id: token id that marks padding and is left out of the average.
    """

    vocab_size: int
    embed_dim: int
    encoder_dims: Sequence[int]
    pad_id: int = 0

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool) -> jax.Array:
        embedded = nn.Embed(self.vocab_size, self.embed_dim, name="embedding")(tokens)
        mask = (tokens != self.pad_id).astype(embedded.dtype)[..., None]
        # An all-padding review (empty text) pools to zeros instead of dividing by zero.
        pooled = (embedded * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
        return MLP(self.encoder_dims, name="mlp")(pooled, deterministic)


class TextClassifier(nn.Module):
    """Classifies token-id sequences: `encoder` (embedding + pooling) -> `fusion` -> `head`.

    Attributes:
        vocab_size: rows of the embedding table.
        embed_dim: embedding width.
        encoder_dims: widths of the encoder MLP after pooling.
        fusion_dims: widths of the fusion MLP (with dropout).
        num_classes: logits per example.
        dropout: dropout rate inside the fusion MLP.

    Example:
        >>> model = TextClassifier(100, 8, (16,), (16,), num_classes=2)
        >>> params = model.init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))["params"]
        >>> params["encoder"]["embedding"]["embedding"].shape
        (100, 8)
    """

    vocab_size: int
    embed_dim: int
    encoder_dims: Sequence[int]
    fusion_dims: Sequence[int]
    num_classes: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        x = TextEncoder(self.vocab_size, self.embed_dim, self.encoder_dims, name="encoder")(tokens, deterministic)
        x = MLP(self.fusion_dims, self.dropout, name="fusion")(x, deterministic)
        return nn.Dense(self.num_classes, name="head")(x)


def parse_dims(value: Sequence[int], field: str, allow_empty: bool = False) -> tuple[int, ...]:
    """Reads a tuple of layer widths from a config field (JSON round-trips turn tuples into lists).

    Args:
        value: the configured widths.
        field: the config field's name, for the error message (e.g. `"model.fusion_dims"`).
        allow_empty: whether no layers at all is acceptable.

    Returns:
        The widths as a tuple of ints.

    Raises:
        ValueError: if a width is not a positive integer, or the tuple is empty and must not be.

    Example:
        >>> parse_dims([64, 32], "model.encoder_dims")
        (64, 32)
    """
    if isinstance(value, int):
        value = (value,)
    dims = tuple(int(d) for d in value)
    if any(d < 1 or d != w for d, w in zip(dims, value)):
        raise ConfigError(f"config.{field}={tuple(value)!r}: every width must be a positive integer.")
    if not dims and not allow_empty:
        raise ConfigError(
                f"config.{field} is empty; give at least one width so that the module exists in the "
                "parameter tree (grafting and skip rules refer to it by name)."
        )
    return dims
