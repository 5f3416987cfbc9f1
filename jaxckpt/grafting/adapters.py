"""Shape adapters: how a graft maps a source leaf onto a target of another shape.

A target leaf whose shape differs from its source leaf is `mismatched` (kept
fresh) unless an adapter rule names it. Then:

* `"resize"` copies the overlapping block along every axis; the rest keeps the
  fresh init;
* `"interpolate"` resamples linearly along the axes whose size differs;
* `fn(source_array, target_leaf)` returns the new leaf, at the target shape.

Structural adapters, which change the tree's structure rather than a leaf's shape, are in
`jaxckpt.grafting.structure`.
"""

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Adapter = str | Callable[[Any, Any], Any]
"""`"resize"`, `"interpolate"`, or `fn(source_array, target_leaf) -> array`."""

_ADAPTER_NAMES = ("resize", "interpolate")


def normalize_adapters(
    adapters: Mapping[str, Adapter] | None,
) -> tuple[tuple[str, Adapter], ...]:
    """Normalises adapter rules to `((regex, adapter), ...)`.

    Args:
        adapters: None or `{regex: adapter}`. (A config's `"regex:resize,..."` string is parsed
            by `jaxckpt.config_strings.parse_adapters`.)

    Returns:
        The rules in order.

    Raises:
        TypeError: if `adapters` is a string or not a dict.
        ValueError: for an unknown adapter name.

    Example:
        >>> normalize_adapters({"head": "resize"})
        (('head', 'resize'),)
    """
    if adapters is None:
        return ()
    if not isinstance(adapters, Mapping):
        hint = (" (the 'regex:adapter,...' form is for configs and command lines: parse it with"
                " jaxckpt.config_strings.parse_adapters)") if isinstance(adapters, str) else ""
        raise TypeError(f"adapters must be None or a dict {{regex: adapter}}, e.g. {{'head/.*': 'resize'}};"
                        f" got {adapters!r}{hint}.")
    rules = list(adapters.items())
    for pattern, adapter in rules:
        if not callable(adapter) and adapter not in _ADAPTER_NAMES:
            raise ValueError(f"Adapter {adapter!r} for {pattern!r} is unknown; use"
                             f" one of {_ADAPTER_NAMES} or a callable"
                             " fn(source_array, target_leaf) -> array.")
    return tuple(rules)


def adapter_name(adapter: Adapter) -> str:
    """The name a `GraftReport` gives an adapter: its own, or the function's.

    Example:
        >>> adapter_name("resize"), adapter_name(lambda source, target: target)
        ('resize', '<lambda>')
    """
    return adapter if isinstance(adapter, str) else getattr(
        adapter, "__name__", repr(adapter))


def adapt(adapter: Adapter, value: Any, target_leaf: Any, shape: tuple[int, ...],
          dtype: np.dtype, path: str) -> Any:
    """Maps a source array onto a target leaf of another shape.

    Args:
        adapter: `"resize"`, `"interpolate"` or `fn(source_array, target_leaf)`.
        value: the source array.
        target_leaf: the freshly initialised target leaf (`resize` keeps its
            values outside the overlap).
        shape: the target leaf's shape.
        dtype: the target leaf's dtype.
        path: the target path, to name in errors.

    Returns:
        An array of the target shape; `graft` then casts and places it.

    Raises:
        ValueError: if a callable adapter returns another shape.

    Example:
        >>> adapt("resize", np.ones((2, 2)), np.zeros((3, 1)), (3, 1),
        ...       np.dtype("float32"), "head").tolist()
        [[1.0], [1.0], [0.0]]
    """
    if adapter == "resize":
        # Copy the overlap along every axis; the rest keeps the fresh init.
        overlap = tuple(slice(0, min(a, b)) for a, b in zip(np.shape(value), shape))
        if isinstance(target_leaf, jax.Array):
            return target_leaf.at[overlap].set(jnp.asarray(value[overlap], dtype))
        out = np.array(target_leaf, dtype=dtype)
        out[overlap] = np.asarray(value[overlap], dtype)
        return out
    if adapter == "interpolate":
        # Plain separable linear interpolation at half-pixel centres (as TF and
        # PyTorch bilinear with align_corners=False): axes of equal size come back
        # unchanged, and with no antialiasing filter a shrink samples the source
        # rather than averaging it, so values stay those of a linear interpolant.
        as_float = jnp.asarray(value)
        if not jnp.issubdtype(as_float.dtype, jnp.floating):
            as_float = as_float.astype(jnp.float32)
        return jax.image.resize(as_float, shape, method="linear", antialias=False)
    out = adapter(value, target_leaf)
    if tuple(np.shape(out)) != tuple(shape):
        raise ValueError(
            f"Adapter {adapter_name(adapter)!r} returned shape {np.shape(out)} for"
            f" {path!r}, whose target shape is {shape}. It must return the target"
            " shape.")
    return out
