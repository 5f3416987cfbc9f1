r"""The string mini-languages of configs and command lines, parsed into the Python API's values.

A config field or `--config.KEY=VALUE` flag holds one string; the Python API takes dicts and
sequences (STYLE #11). This module is the one place that turns the first into the second:

| config field                   | string form                       | Python value                      |
| ------------------------------ | --------------------------------- | --------------------------------- |
| `checkpoint.mapping`           | `"bert:encoder,cls:head"`         | `{"bert": "encoder", "cls": "head"}` |
| `checkpoint.skip`, `optimizer.freeze` | `"head,.*/bias"`           | `("head", ".*/bias")`             |
| `checkpoint.adapters`          | `"head:resize,pos:interpolate"`   | `{"head": "resize", "pos": "interpolate"}` |
| `optimizer.lr_multipliers`     | `"head:10,encoder:0.1"`           | `(("head", 10.0), ("encoder", 0.1))` |
| `checkpoint.rename`            | `r"fc(\d)\.weight=>Dense_\1/kernel;..."` | `((r"fc(\d)\.weight", r"Dense_\1/kernel"), ...)` |
| `mesh.rules`                   | `"encoder/.*kernel=fsdp,None;bias="` | `(("encoder/.*kernel", ("fsdp", None)), ("bias", ()))` |

`checkpoint.structure` (`"split h_{i}/qkv => h_{i}/q, h_{i}/k, h_{i}/v @ 1; ..."`) is parsed by
`jaxckpt.grafting.structure.parse_structure` instead: its values are the graft's rule types, and
this module sits below the graft layer.

Only the syntax is checked here; what the values mean (a regex that compiles, a known adapter, a
multiplier >= 0, a rule that matches something) is checked by the function that uses them, for
Python callers and configs alike. A config value that is already a Python structure (a config file
may set `skip=("head",)`) passes through unchanged. Empty strings and None mean "no rules".
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxckpt.errors import ConfigError


def _pairs(value: Any) -> tuple[tuple, ...]:
    """A rules value already in Python form (a mapping, or a sequence of pairs) as a tuple of pairs."""
    return tuple(value.items() if isinstance(value, Mapping) else (tuple(p) for p in value))


def _items(text: str, sep: str) -> list[str]:
    return [item.strip() for item in text.split(sep) if item.strip()]


def parse_patterns(value: str | Any) -> tuple[str, ...]:
    """`"a, b"` -> `("a", "b")`, for `checkpoint.skip` and `optimizer.freeze`.

    Commas always separate patterns in the string form; a regex containing a comma (`a{1,3}`) needs
    a sequence, which a Python config file can set.

    Args:
        value: a comma-separated string, a sequence of patterns (returned as a tuple), or None.

    Returns:
        The patterns in order, without empty entries.

    Example:
        >>> parse_patterns("encoder, fusion/Dense_0")
        ('encoder', 'fusion/Dense_0')
    """
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(_items(value, ","))
    return tuple(value)


def parse_mapping(value: str | Mapping[str, str] | None) -> dict[str, str] | None:
    """`"src:dst,src2:dst2"` -> `{"src": "dst", "src2": "dst2"}`, for `checkpoint.mapping`.

    Args:
        value: the string form (an empty side is the root: `":backbone"`), a dict (returned as a
            dict), or None / a blank string (the whole tree onto itself).

    Returns:
        The rules, or None for the whole tree onto itself.

    Raises:
        ValueError: for a rule without exactly one `:`, or a source prefix named twice.

    Example:
        >>> parse_mapping("bert:encoder, cls/head:head")
        {'bert': 'encoder', 'cls/head': 'head'}
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        return dict(value)
    rules: dict[str, str] = {}
    for rule in value.split(","):
        if rule.count(":") != 1:
            raise ValueError(f"Mapping rule {rule.strip()!r} in {value!r} must be 'source_prefix:target_prefix' "
                             "(one ':'); separate rules with ','.")
        src, dst = (side.strip() for side in rule.split(":"))
        if src in rules:
            raise ValueError(f"Mapping {value!r} names the source prefix {src!r} in more than one rule; "
                             "each may appear once.")
        rules[src] = dst
    return rules


def parse_adapters(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """`"regex:resize,regex2:interpolate"` -> `{"regex": "resize", ...}`, for `checkpoint.adapters`.

    The adapter name follows the last `:`, so a regex may contain colons; commas separate rules.

    Args:
        value: the string form, a dict (returned as a dict), or None / a blank string.

    Returns:
        `{regex: adapter_name}` in rule order.

    Raises:
        ValueError: for a rule without a `:` or with an empty regex.

    Example:
        >>> parse_adapters("head:resize")
        {'head': 'resize'}
    """
    if value is None:
        return {}
    if not isinstance(value, str):
        return dict(value)
    rules = {}
    for rule in _items(value, ","):
        pattern, sep, name = rule.rpartition(":")
        if not sep or not pattern.strip():
            raise ValueError(f"Adapter rule {rule!r} must be 'regex:resize' or 'regex:interpolate'.")
        rules[pattern.strip()] = name.strip()
    return rules


def parse_lr_multipliers(value: str | Any) -> tuple[tuple[str, float], ...]:
    """`"regex:mult,regex2:mult"` -> `(("regex", mult), ...)`, for `optimizer.lr_multipliers`.

    The multiplier follows the last `:`, so a regex may contain colons (`(?:a|b)/kernel:0.1`);
    commas separate rules.

    Args:
        value: the string form, a dict or a sequence of `(regex, multiplier)` pairs (returned as
            pairs, unchanged), or None / a blank string.

    Returns:
        The rules in order (the first matching rule wins where they are used).

    Raises:
        ValueError: for a rule without a `:`, with an empty regex, or whose multiplier is not a number.

    Example:
        >>> parse_lr_multipliers("head:10, encoder/Dense_0:0.1")
        (('head', 10.0), ('encoder/Dense_0', 0.1))
    """
    if value is None:
        return ()
    if not isinstance(value, str):
        return _pairs(value)
    rules = []
    for item in _items(value, ","):
        pattern, sep, mult = item.rpartition(":")
        if not sep or not pattern.strip():
            raise ValueError(f"lr_multipliers rule {item!r} must look like 'regex:multiplier', e.g. 'head:10'.")
        try:
            rules.append((pattern.strip(), float(mult)))
        except ValueError:
            raise ValueError(f"lr_multipliers rule for {pattern.strip()!r}: multiplier {mult.strip()!r} is not a "
                             "number (write e.g. 'head:0.1').") from None
    return tuple(rules)


def parse_rename(value: str | Any) -> tuple[tuple[str, str], ...]:
    r"""`"regex=>path;regex2=>path2"` -> `(("regex", "path"), ...)`, for `checkpoint.rename`.

    `=>` and `;` separate (both are literal characters in a regex, and neither appears in PyTorch
    parameter names, so they cannot clash with the rules themselves).

    Args:
        value: the string form, a dict or a sequence of `(regex, path)` pairs (returned as pairs),
            or None / a blank string.

    Returns:
        The rules in order (first match wins).

    Raises:
        ValueError: for a rule without `=>`.

    Example:
        >>> parse_rename(r"fc1\.weight=>Dense_0/kernel; fc(\d)\.bias=>Dense_\1/bias")
        (('fc1\\.weight', 'Dense_0/kernel'), ('fc(\\d)\\.bias', 'Dense_\\1/bias'))
    """
    if value is None:
        return ()
    if not isinstance(value, str):
        return _pairs(value)
    rules = []
    for item in _items(value, ";"):
        pattern, sep, target = item.partition("=>")
        if not sep:
            raise ValueError(f"rename rule {item!r} must look like 'regex=>path', e.g. "
                             r"'encoder\.(\d+)\.weight=>encoder/Dense_\1/kernel'; separate rules with ';'.")
        rules.append((pattern.strip(), target.strip()))
    return tuple(rules)


def parse_mesh_rules(value: str | Any) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """`"regex=spec;regex=spec"` -> `((regex, spec entries), ...)`, for `mesh.rules`.

    `;` separates rules and the last `=` splits a rule; the spec lists one entry per leading
    dimension, comma-separated: an axis name, `None` (not split), or axes joined by `+`
    (`data+fsdp`); an empty spec replicates. `jaxckpt.state_shardings` takes the result (each
    spec as a `PartitionSpec`'s entries).

    Args:
        value: the string form, a dict or a sequence of `(regex, spec)` pairs (returned as pairs),
            or None / a blank string.

    Returns:
        The rules in order (first match wins).

    Raises:
        ConfigError: for a rule without `=` or with an empty regex.

    Example:
        >>> parse_mesh_rules("encoder/.*kernel=fsdp,None; bias=")
        (('encoder/.*kernel', ('fsdp', None)), ('bias', ()))
    """
    if value is None:
        return ()
    if not isinstance(value, str):
        return _pairs(value)
    rules = []
    for item in _items(value, ";"):
        regex, sep, spec = item.rpartition("=")
        if not sep or not regex.strip():
            raise ConfigError(f"mesh rule {item!r} must look like 'regex=spec', e.g. 'encoder/.*kernel=fsdp,None' "
                              "(an empty spec replicates); separate rules with ';'.")
        entries = [e.strip() for e in spec.split(",")] if spec.strip() else []
        rules.append((regex.strip(), tuple(None if e in ("", "None", "none") else tuple(e.split("+")) if "+" in e
                                           else e for e in entries)))
    return tuple(rules)


def checkpoint_options(checkpoint: Any) -> dict[str, Any]:
    """The `load_params` / `plan` keyword arguments a `config.checkpoint` section describes.

    Args:
        checkpoint: the section (an `ml_collections.ConfigDict` or a mapping) with `mapping`, `skip`,
            `adapters` and `rename` (any may be absent).

    Returns:
        `{"mapping": dict | None, "skip": tuple, "adapters": dict | None, "rename": tuple | None}`.

    Raises:
        ValueError: for a malformed rule (see the parsers above).
    """
    get = checkpoint.get if hasattr(checkpoint, "get") else lambda key, default=None: getattr(checkpoint, key, default)
    return {"mapping": parse_mapping(get("mapping", None)),
            "skip": parse_patterns(get("skip", None) or None),
            "adapters": parse_adapters(get("adapters", None) or None) or None,
            "rename": parse_rename(get("rename", None) or None) or None}
