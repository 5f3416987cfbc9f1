"""Flax modules of HF BERT, ViT and GPT-2, named so that HF -> Flax weight tables stay plain.

`TransformerConfig` holds what the modules read from an HF config (under one set of names for the
three families); `experiments.tasks.hf_models` builds them from `config.json` and loads HF weights.
Parameter names (all Dense layers plain `(in, out)` kernels, no per-head reshapes):

* BERT: `embeddings/{word,position,token_type}_embeddings`, `embeddings/norm`,
  `encoder/layer_{i}/{attention/{query,key,value,output},attention_norm,intermediate,output,
  mlp_norm}`, `pooler`; `BertForSequenceClassification` nests it as `bert` next to `classifier`.
* ViT: `vit/embeddings/{cls_token,position_embeddings,patch_embeddings}`, the same layers as BERT
  (pre-norm), `vit/norm`, `classifier`.
* GPT-2: `transformer/{wte,wpe}`, `transformer/h_{i}/...` (the same layer names, pre-norm; query,
  key and value separate where HF fuses them in `c_attn`), `transformer/norm`; the LM head is
  `wte.attend`, tied as in HF.

Dropout follows the config's rates and runs only with `deterministic=False` (and a `dropout` rng).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {  # HF name -> function.
    "gelu": lambda x: nn.gelu(x, approximate=False),  # HF's "gelu" is the exact (erf) one.
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The fields of an HF config that the Flax models use, under one set of names."""

    hidden_size: int  # Width of the residual stream.
    num_layers: int  # Transformer layers.
    num_heads: int  # Attention heads per layer.
    intermediate_size: int  # Width of each layer's MLP.
    activation: str  # Key of `ACTIVATIONS` (HF's `hidden_act` / `activation_function`).
    layer_norm_eps: float  # Epsilon of every LayerNorm.
    hidden_dropout: float = 0.0  # Dropout on each residual branch.
    attention_dropout: float = 0.0  # Dropout on the attention weights.
    embedding_dropout: float = 0.0  # Dropout on the summed embeddings.
    classifier_dropout: float = 0.0  # Dropout before a classifier head.
    initializer_range: float = 0.02  # Stddev of the normal init of kernels and embeddings.
    vocab_size: int = 0  # Text: rows of the token embedding.
    max_positions: int = 0  # Text: rows of the position embedding.
    type_vocab_size: int = 0  # BERT: rows of the token-type embedding.
    num_labels: int = 0  # Classifiers: logits per example.
    image_size: int = 0  # ViT: height and width of the input images.
    patch_size: int = 0  # ViT: height and width of a patch.
    num_channels: int = 0  # ViT: channels of the input images.


def _mask_bias(mask: jax.Array, dtype: Any) -> jax.Array:
    """An additive attention bias: 0 where `mask` is true, the dtype's minimum elsewhere (as HF)."""
    return jnp.where(mask, 0.0, jnp.finfo(dtype).min).astype(dtype)


def _positions(cfg: TransformerConfig, input_ids: jax.Array) -> jax.Array:
    """`[[0, 1, ..., length - 1]]`; raises (at trace time) past the position embedding's rows."""
    length = input_ids.shape[1]
    if length > cfg.max_positions:
        raise ValueError(f"input_ids has length {length}; the model embeds at most "
                         f"{cfg.max_positions} positions (config max_position_embeddings / "
                         "n_positions). Truncate the sequences.")
    return jnp.arange(length)[None, :]


def _dense(cfg: TransformerConfig, features: int, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.normal(cfg.initializer_range), name=name)


def _embed(cfg: TransformerConfig, rows: int, name: str | None = None) -> nn.Embed:
    return nn.Embed(rows, cfg.hidden_size, name=name,
                    embedding_init=nn.initializers.normal(cfg.initializer_range))


def _layer_norm(cfg: TransformerConfig, name: str | None = None) -> nn.LayerNorm:
    # Two-pass variance, as PyTorch: the one-pass E[x^2] - E[x]^2 loses digits on large activations.
    return nn.LayerNorm(cfg.layer_norm_eps, use_fast_variance=False, name=name)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate `query`, `key`, `value` and `output` Dense layers."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        head_dim = cfg.hidden_size // cfg.num_heads
        query, key, value = (
            _dense(cfg, cfg.hidden_size, name)(x).reshape(*x.shape[:-1], cfg.num_heads, head_dim)
            for name in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(head_dim).astype(x.dtype)
        weights = jax.nn.softmax(scores + bias, axis=-1)
        weights = nn.Dropout(cfg.attention_dropout)(weights, deterministic=deterministic)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, value).reshape(x.shape)
        return _dense(cfg, cfg.hidden_size, "output")(attended)


class TransformerLayer(nn.Module):
    """Attention then MLP (`intermediate`, activation, `output`), each with a residual and a norm.

    Attributes:
        config: the model's sizes and rates.
        pre_norm: normalise each block's input (ViT, GPT-2) rather than its residual sum (BERT).
    """

    config: TransformerConfig
    pre_norm: bool

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        attention_norm = _layer_norm(cfg, "attention_norm")
        mlp_norm = _layer_norm(cfg, "mlp_norm")

        def attention(y):
            y = SelfAttention(cfg, name="attention")(y, bias, deterministic)
            return nn.Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)

        def mlp(y):
            y = ACTIVATIONS[cfg.activation](_dense(cfg, cfg.intermediate_size, "intermediate")(y))
            y = _dense(cfg, cfg.hidden_size, "output")(y)
            return nn.Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)

        if self.pre_norm:
            x = x + attention(attention_norm(x))
            return x + mlp(mlp_norm(x))
        x = attention_norm(x + attention(x))
        return mlp_norm(x + mlp(x))


class Encoder(nn.Module):
    """`layer_0` ... `layer_{n-1}`, applied in turn."""

    config: TransformerConfig
    pre_norm: bool

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        for i in range(self.config.num_layers):
            x = TransformerLayer(self.config, self.pre_norm, name=f"layer_{i}")(x, bias, deterministic)
        return x


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, normalised (`norm`)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array,
                 deterministic: bool) -> jax.Array:
        cfg = self.config
        positions = _positions(cfg, input_ids)
        x = (_embed(cfg, cfg.vocab_size, "word_embeddings")(input_ids)
             + _embed(cfg, cfg.max_positions, "position_embeddings")(positions)
             + _embed(cfg, cfg.type_vocab_size, "token_type_embeddings")(token_type_ids))
        x = _layer_norm(cfg, "norm")(x)
        return nn.Dropout(cfg.embedding_dropout)(x, deterministic=deterministic)


class BertModel(nn.Module):
    """HF `BertModel`: returns `last_hidden_state` (batch, length, hidden); `encode` also the pooled."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = Encoder(cfg, pre_norm=False)
        self.pooler = _dense(cfg, cfg.hidden_size)

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """Returns `(last_hidden_state, pooler_output)`."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, deterministic)
        bias = _mask_bias(attention_mask[:, None, None, :] > 0, x.dtype)
        x = self.encoder(x, bias, deterministic)
        return x, jnp.tanh(self.pooler(x[:, 0]))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        # The pooler runs too, so that init creates its parameters (HF's file holds them); under
        # jit its unused output costs nothing.
        return self.encode(input_ids, attention_mask, token_type_ids, deterministic)[0]


class BertForSequenceClassification(nn.Module):
    """HF `BertForSequenceClassification`: `bert`, then `classifier` on the pooled output -> logits."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        _, pooled = BertModel(cfg, name="bert").encode(input_ids, attention_mask, token_type_ids,
                                                        deterministic)
        pooled = nn.Dropout(cfg.classifier_dropout)(pooled, deterministic=deterministic)
        return _dense(cfg, cfg.num_labels, "classifier")(pooled)


class ViTEmbeddings(nn.Module):
    """Patches (a strided conv, `patch_embeddings`) after a `cls_token`, plus position embeddings."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        patch = (cfg.patch_size, cfg.patch_size)
        x = nn.Conv(cfg.hidden_size, patch, strides=patch, padding="VALID", kernel_init=init,
                    name="patch_embeddings")(images)
        x = x.reshape(x.shape[0], -1, cfg.hidden_size)  # Row-major patches, as HF's flatten(2).
        cls_token = self.param("cls_token", init, (1, 1, cfg.hidden_size))
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        positions = self.param("position_embeddings", init, (1, num_patches + 1, cfg.hidden_size))
        x = jnp.concatenate([jnp.broadcast_to(cls_token, (x.shape[0], 1, cfg.hidden_size)), x], axis=1)
        return nn.Dropout(cfg.embedding_dropout)(x + positions, deterministic=deterministic)


class ViTModel(nn.Module):
    """HF `ViTModel` without its pooler: `embeddings`, pre-norm `encoder`, `norm` -> hidden states."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values has shape {pixel_values.shape}; this ViT takes NCHW "
                             f"images of shape (batch, {', '.join(map(str, expected))}).")
        images = jnp.transpose(pixel_values, (0, 2, 3, 1))  # NCHW (PyTorch) -> NHWC (Flax).
        x = ViTEmbeddings(cfg, name="embeddings")(images, deterministic)
        no_mask = jnp.zeros((), x.dtype)
        x = Encoder(cfg, pre_norm=True, name="encoder")(x, no_mask, deterministic)
        return _layer_norm(cfg, "norm")(x)


class ViTForImageClassification(nn.Module):
    """HF `ViTForImageClassification`: `vit`, then `classifier` on the CLS token -> logits."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        x = ViTModel(cfg, name="vit")(pixel_values, deterministic)
        return _dense(cfg, cfg.num_labels, "classifier")(x[:, 0])


class GPT2Model(nn.Module):
    """HF `GPT2Model`: `wte` + `wpe`, pre-norm layers `h_{i}` (causal), `norm` -> hidden states."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.wte = _embed(cfg, cfg.vocab_size)
        self.wpe = _embed(cfg, cfg.max_positions)
        # A list attribute named `h` makes the children `h_0`, `h_1`, ... as in HF's `h.0`.
        self.h = [TransformerLayer(cfg, pre_norm=True) for _ in range(cfg.num_layers)]
        self.norm = _layer_norm(cfg)
        self.dropout = nn.Dropout(cfg.embedding_dropout)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        length = input_ids.shape[1]
        positions = _positions(self.config, input_ids)
        x = self.dropout(self.wte(input_ids) + self.wpe(positions), deterministic=deterministic)
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] > 0)
        bias = _mask_bias(mask, x.dtype)
        for layer in self.h:
            x = layer(x, bias, deterministic)
        return self.norm(x)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Logits over the vocabulary: the hidden states against the (tied) token embedding."""
        return self.wte.attend(hidden)


class GPT2LMHeadModel(nn.Module):
    """HF `GPT2LMHeadModel`: `transformer`, then logits through the tied `wte` (no head params)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        transformer = GPT2Model(self.config, name="transformer")
        return transformer.attend(transformer(input_ids, attention_mask, deterministic))


