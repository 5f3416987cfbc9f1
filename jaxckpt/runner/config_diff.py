"""Comparing configs field by field: what changed since a checkpoint was saved, for the log and `inspect`."""

from __future__ import annotations

import json
from typing import Any

_ABSENT = "(absent)"


def flat_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """A config as `{"train.num_steps": 600, ...}`, with values as JSON gives them back.

    Args:
      config: a nested mapping (a saved `config.json`) or an `ml_collections.ConfigDict`.
      prefix: prepended to every key (for recursion).

    Returns:
      One entry per leaf field; tuples become lists, so a saved config and a live one compare equal.
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
    return out


def config_changes(before: Any, after: Any) -> list[tuple[str, Any, Any]]:
    """The fields whose values differ between two configs, sorted by key.

    Args:
      before: the earlier config (e.g. the one saved in a checkpoint), as for `flat_config`; None
        counts as empty.
      after: the later config.

    Returns:
      `[(key, before_value, after_value), ...]`; a field one side lacks shows as "(absent)".

    Example:
      >>> config_changes({"train": {"num_steps": 400}}, {"train": {"num_steps": 600}})
      [('train.num_steps', 400, 600)]
    """
    old, new = flat_config(before or {}), flat_config(after or {})
    return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
            if old.get(k, _ABSENT) != new.get(k, _ABSENT)]
