"""A byte-level decoder-only transformer language model over Python standard-library sources.

Data: see `lm_data` (the first `config.data.corpus_mb` MB of the sorted stdlib `.py` files, split
by a hash of each file's path). Examples are windows of `seq_len` input bytes and the `seq_len`
bytes that follow each. The parameters are `embed`, `pos_embed`, `blocks_0` ... `blocks_{n-1}`,
`final_norm` and `head`, so a deeper model can take the blocks of a shallower one by name
(`jaxckpt.graft(small, big, strict=False)` keeps the extra blocks fresh).

Config fields read:
    model.num_layers, model.num_heads, model.d_model, model.d_ff, model.seq_len, model.dropout.
    data.source_dir: folder of `.py` files; "" means this interpreter's standard library.
    data.corpus_mb: corpus budget in MB (1e6 bytes); data.val_fraction, data.test_fraction.
    predict.prompt_len, predict.sample_len: bytes of prompt and of sampled continuation
        (together at most model.seq_len); predict.temperature: 0 for greedy decoding;
        predict.seed: sampling seed (each example's key is this seed folded with its id).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator, Mapping

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.tasks import lm_data
from jaxckpt.errors import ConfigError
from jaxckpt.types import Batch, Params

VOCAB_SIZE = 256
"""One token per byte value."""

_BYTE_COLUMNS = ("prompt", "sample", "reference")
"""The `predict_fn` outputs that `format_predictions` decodes to text."""

_LOG = logging.getLogger(__name__)


class Block(nn.Module):
    """Pre-LN transformer block: causal self-attention then a GELU MLP, each with a residual."""

    num_heads: int
    d_ff: int
    dropout: float

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        h = nn.LayerNorm(name="attn_norm")(x)
        # Dropout acts on the block's two outputs below, not on the attention weights.
        h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attn")(
                h, mask=mask, deterministic=True
        )
        x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = nn.LayerNorm(name="mlp_norm")(x)
        h = nn.Dense(self.d_ff, name="mlp_in")(h)
        h = nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(h))
        return x + nn.Dropout(self.dropout)(h, deterministic=deterministic)


class TransformerLM(nn.Module):
    """Next-byte logits `[batch, length, 256]` for byte ids `[batch, length]`, `length <= max_len`.

    Attributes:
        num_layers: transformer blocks (`blocks_0` ... `blocks_{num_layers-1}`).
        num_heads: attention heads per block (must divide d_model).
        d_model: residual width.
        d_ff: hidden width of each block's MLP.
        max_len: rows of the learned positional embedding.
        dropout: dropout after attention and after the MLP.

    Example:
        >>> model = TransformerLM(num_layers=2, num_heads=2, d_model=16, d_ff=32, max_len=8)
        >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        >>> sorted(params)
        ['blocks_0', 'blocks_1', 'embed', 'final_norm', 'head', 'pos_embed']
    """

    num_layers: int
    num_heads: int
    d_model: int
    d_ff: int
    max_len: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        length = tokens.shape[-1]
        if length > self.max_len:
            raise ValueError(f"Got {length} tokens but the model has {self.max_len} positions; raise model.seq_len.")
        x = nn.Embed(VOCAB_SIZE, self.d_model, name="embed")(tokens)
        positions = nn.Embed(self.max_len, self.d_model, name="pos_embed")(jnp.arange(length))
        x = nn.Dropout(self.dropout)(x + positions, deterministic=deterministic)
        mask = nn.make_causal_mask(tokens)
        for i in range(self.num_layers):
            x = Block(self.num_heads, self.d_ff, self.dropout, name=f"blocks_{i}")(x, mask, deterministic)
        x = nn.LayerNorm(name="final_norm")(x)
        return nn.Dense(VOCAB_SIZE, name="head")(x)


class LanguageModelTask:
    """Next-byte prediction over `lm_data` windows; satisfies the loop's task contract.

    Batches hold `inputs` and `targets` (int32 `[batch, seq_len]`); eval batches add `id` and `mask`.

    Example:
        >>> task = build(get_config())  # experiments/configs/lm.py
        >>> loss, aux = task.loss_fn(task.init_params(jax.random.key(0)),
        ...                          next(task.train_iterator(8, seed=0)), jax.random.key(1))
    """

    splits = ("val", "test")

    def __init__(
            self,
            *,
            model: TransformerLM,
            corpus: lm_data.Corpus,
            prompt_len: int,
            sample_len: int,
            temperature: float,
            sample_seed: int = 0,
    ):
        """Creates the task.

        Args:
            model: the language model; its `max_len` is the window length.
            corpus: the three splits' bytes.
            prompt_len: bytes of each eval window given as the prompt in `predict_fn`.
            sample_len: bytes generated after the prompt.
            temperature: sampling temperature; 0 decodes greedily.
            sample_seed: seed of the sampling keys.

        Raises:
            ValueError: if the prompt and sample do not fit in the model's positions, or a split
                has no complete window.
        """
        if prompt_len < 1 or sample_len < 1 or prompt_len + sample_len > model.max_len:
            raise ConfigError(
                    f"predict.prompt_len={prompt_len} and predict.sample_len={sample_len} must be positive and "
                    f"sum to at most model.seq_len={model.max_len}."
            )
        if temperature < 0:
            raise ConfigError(f"predict.temperature must be >= 0 (0 is greedy), got {temperature}.")
        self.model = model
        self.corpus = corpus
        self.prompt_len = prompt_len
        self.sample_len = sample_len
        self.temperature = float(temperature)
        self.sample_seed = sample_seed
        self._windows = {name: lm_data.Windows(b, model.max_len) for name, b in corpus.splits.items()}
        lm_data.check_sizes(self._windows, lm_data.SPLITS)

    def init_params(self, rng: jax.Array) -> Params:
        """Fresh parameters: `embed`, `pos_embed`, `blocks_<i>`, `final_norm`, `head`."""
        tokens = jnp.zeros((1, self.model.max_len), jnp.int32)
        return self.model.init({"params": rng}, tokens, deterministic=True)["params"]

    def _token_losses(self, params: Params, batch: Batch, rng: jax.Array | None) -> jax.Array:
        if rng is None:
            logits = self.model.apply({"params": params}, batch["inputs"], deterministic=True)
        else:
            logits = self.model.apply(
                    {"params": params}, batch["inputs"], deterministic=False, rngs={"dropout": rng}
            )
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])

    def loss_fn(self, params: Params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean next-byte cross-entropy (nats) with dropout on, and `{"bits_per_byte": ...}`."""
        loss = self._token_losses(params, batch, rng).mean()
        return loss, {"bits_per_byte": loss / math.log(2)}

    def metrics_fn(self, params: Params, batch: Batch) -> dict[str, jax.Array]:
        """Per-example mean token `loss` (nats) and `bits_per_byte`, shape `[batch]`, dropout off.

        Every window has `seq_len` targets, so the masked mean of these over a split is the exact
        mean over its tokens; `summarize` turns the mean loss into a perplexity.
        """
        loss = self._token_losses(params, batch, None).mean(axis=-1)
        return {"loss": loss, "bits_per_byte": loss / math.log(2)}

    def summarize(self, means: Mapping[str, float]) -> dict[str, float]:
        """Adds `perplexity = exp(loss)` (per byte) to a split's averaged metrics."""
        summary = dict(means)
        if "loss" in summary:
            summary["perplexity"] = float(math.exp(summary["loss"]))
        return summary

    def predict_fn(self, params: Params, batch: Batch) -> dict[str, jax.Array]:
        """Continues each example's first `prompt_len` bytes by `sample_len` sampled bytes.

        Decoding reruns the model over a fixed buffer of `prompt_len + sample_len` bytes for each
        new byte (causal masking makes the unfilled tail irrelevant), so one shape is compiled.
        Each example samples with the key `fold_in(key(sample_seed), id)`, so its sample does not
        depend on the batch it is in.

        Returns:
            `prompt`, `sample` and `reference` (the true continuation) as int32 byte arrays.
        """
        inputs = batch["inputs"]
        total = self.prompt_len + self.sample_len
        buffer = jnp.zeros((inputs.shape[0], total), jnp.int32).at[:, :self.prompt_len].set(
                inputs[:, :self.prompt_len]
        )
        base = jax.random.key(self.sample_seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(batch["id"])

        def add_byte(t, buffer):
            position = self.prompt_len + t
            logits = self.model.apply({"params": params}, buffer, deterministic=True)
            logits = jax.lax.dynamic_index_in_dim(logits, position - 1, axis=1, keepdims=False)
            if self.temperature == 0:
                chosen = jnp.argmax(logits, axis=-1)
            else:
                step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys)
                chosen = jax.vmap(jax.random.categorical)(step_keys, logits / self.temperature)
            return jax.lax.dynamic_update_index_in_dim(buffer, chosen.astype(jnp.int32), position, axis=1)

        buffer = jax.lax.fori_loop(0, self.sample_len, add_byte, buffer)
        return {
                "prompt": buffer[:, :self.prompt_len],
                "sample": buffer[:, self.prompt_len:],
                "reference": inputs[:, self.prompt_len:total],
        }

    def format_predictions(self, columns: Mapping[str, np.ndarray]) -> dict[str, list]:
        """Decodes the byte columns `[batch, n]` to UTF-8 strings (undecodable bytes become U+FFFD).

        Any other column (e.g. ids the caller added) is passed through as a list of its rows.
        """
        formatted = {}
        for name, value in columns.items():
            value = np.asarray(value)
            if name in _BYTE_COLUMNS:
                formatted[name] = [bytes(row.astype(np.uint8)).decode("utf-8", errors="replace") for row in value]
            else:
                formatted[name] = value.tolist()
        return formatted

    def train_iterator(self, batch_size: int, seed: int) -> grain.DatasetIterator:
        """Endless shuffled training windows; `get_state()`/`set_state()` resume exactly."""
        return lm_data.train_iterator(self._windows["train"], batch_size, seed)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        """One ordered pass over `split`, padded to `batch_size` with `"id"` and `"mask"`."""
        return lm_data.eval_batches(self._split(split), batch_size)

    def num_examples(self, split: str) -> int:
        """Number of windows in `split`."""
        return len(self._split(split))

    def artifacts(self) -> dict[str, Any]:
        """The corpus fingerprint: Python version, file count, hashes and split sizes."""
        return {"corpus": self.corpus.fingerprint()}

    def _split(self, split: str) -> lm_data.Windows:
        if split not in self._windows:
            raise ConfigError(f"Unknown split {split!r}; this task has {sorted(self._windows)}.")
        return self._windows[split]


def build(config: Any, artifacts: Mapping[str, Any] | None = None) -> LanguageModelTask:
    """Builds the language-model task from `config`, reading the corpus.

    Args:
        config: an `ml_collections.ConfigDict` with the fields listed in the module docstring.
        artifacts: what `artifacts()` returned for the run being resumed or evaluated; if its corpus
            fingerprint differs from the corpus read now (another Python version, another budget),
            a warning names what changed. The corpus is still read from `config`.

    Returns:
        The task.

    Raises:
        ValueError: if a size is invalid or a split has no complete window.

    Example:
        >>> task = build(get_config())  # experiments/configs/lm.py
        >>> sorted(task.init_params(jax.random.key(0)))[:2]
        ['blocks_0', 'blocks_1']
    """
    d_model, num_heads = int(config.model.d_model), int(config.model.num_heads)
    if num_heads < 1 or d_model % num_heads:
        raise ConfigError(f"config.model.num_heads={num_heads} must be positive and divide model.d_model={d_model}.")
    model = TransformerLM(
            num_layers=int(config.model.num_layers),
            num_heads=num_heads,
            d_model=d_model,
            d_ff=int(config.model.d_ff),
            max_len=int(config.model.seq_len),
            dropout=float(config.model.dropout),
    )
    corpus = lm_data.read_corpus(
            config.data.source_dir or lm_data.stdlib_dir(),
            max_bytes=int(round(float(config.data.corpus_mb) * 1e6)),
            val_fraction=float(config.data.val_fraction),
            test_fraction=float(config.data.test_fraction),
    )
    if artifacts and "corpus" in artifacts:
        _warn_if_changed(dict(artifacts["corpus"]), corpus.fingerprint())
    return LanguageModelTask(
            model=model,
            corpus=corpus,
            prompt_len=int(config.predict.prompt_len),
            sample_len=int(config.predict.sample_len),
            temperature=float(config.predict.temperature),
            sample_seed=int(config.predict.seed),
    )


def _warn_if_changed(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    changed = {key: (saved.get(key), current[key]) for key in current if saved.get(key) != current[key]}
    if changed:
        details = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items()))
        _LOG.warning(
                "The language-model corpus differs from the one this run was trained on (%s). Metrics are "
                "not comparable across the change; use the same Python version and data settings to match.",
                details,
        )
