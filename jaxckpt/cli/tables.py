"""How `python -m jaxckpt` shows things: plain-text tables of params, optimizer treatment and metrics."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from jaxckpt import config_strings
from jaxckpt.errors import UserError
from jaxckpt.runner.writers import format_metrics


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], right: Sequence[int] = ()) -> str:
    """Plain-text table; columns in `right` are right-aligned (numbers)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join(line(row).rstrip() for row in cells)


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            break
    return f"{n:.1f} {unit}"


def training_spec(optimizer: Any) -> tuple[str, str]:
    """`(freeze, lr_multipliers)` of an optimizer config (ConfigDict or dict); "" when absent."""
    if optimizer is None:
        return "", ""
    get = optimizer.get if isinstance(optimizer, Mapping) else lambda k, d: getattr(optimizer, k, d)
    return get("freeze", "") or "", get("lr_multipliers", "") or ""


def describe_training(params: Any, freeze: Any, multipliers: Any) -> dict[str, str]:
    """`describe_trainable` as a user error when a pattern matches no param."""
    from jaxckpt.train.optim import describe_trainable

    try:
        return describe_trainable(params, config_strings.parse_patterns(freeze or None),
                                  config_strings.parse_lr_multipliers(multipliers or None))
    except ValueError as e:
        raise UserError(f"optimizer.freeze={freeze!r} / optimizer.lr_multipliers={multipliers!r}: {e}") from e


def training_summary(labels: Mapping[str, str], sizes: Mapping[str, int]) -> str:
    """One line per label: how many leaves and values are frozen, scaled or trained."""
    totals: dict[str, tuple[int, int]] = {}
    for path, label in labels.items():
        leaves, values = totals.get(label, (0, 0))
        totals[label] = (leaves + 1, values + sizes[path])
    meaning = {"frozen": "no update, no optimizer moments", "train": "the base learning rate"}
    return "\n".join(f"  {label:<8} {leaves} {'leaf' if leaves == 1 else 'leaves'}, {values:,} values: "
                     f"{meaning.get(label, f'learning rate times {label[1:]}')}"
                     for label, (leaves, values) in sorted(totals.items()))


def saved_training(flat: Mapping[str, Any], optimizer: Any) -> tuple[dict[str, str], str]:
    """Labels `{"params/...": "frozen" | "x10" | "train"}` from a run's saved optimizer config, and a summary.

    A run's saved patterns matched its own params when it trained, so a failure here means the step
    is not that run's (a zoo entry, a moved step): say so instead of failing the whole inspection.
    """
    from jaxckpt.tree.treepath import unflatten_dict

    freeze, multipliers = training_spec(optimizer)
    if not (freeze or multipliers):
        return {}, ""
    prefix = "params/"
    params = {p[len(prefix):]: leaf for p, leaf in flat.items() if p.startswith(prefix)}
    heading = f"optimizer (saved config): freeze={freeze!r} lr_multipliers={multipliers!r}"
    try:
        described = describe_training(unflatten_dict(params), freeze, multipliers)
    except UserError as e:
        return {}, f"{heading}\n  not applicable to these params: {e}"
    sizes = {p: math.prod(leaf.shape) for p, leaf in params.items()}
    summary = heading + "\n" + training_summary(described, sizes)
    return {prefix + p: label for p, label in described.items()}, summary


def state_table(flat: Mapping[str, Any], *, show_all: bool, labels: Mapping[str, str] | None = None) -> str:
    """Rows of path/shape/dtype/bytes for params (or everything), and totals per top-level group.

    With `labels` (`{path: "frozen" | "x10" | "train"}`), a `training` column shows each label.
    """
    rows, groups = [], {}
    has_params = any(p.startswith("params/") for p in flat)
    for path, leaf in sorted(flat.items()):
        size = math.prod(leaf.shape)
        nbytes = size * leaf.dtype.itemsize
        group = path.split("/", 1)[0]
        count, total, arrays = groups.get(group, (0, 0, 0))
        groups[group] = (count + size, total + nbytes, arrays + 1)
        if show_all or group == "params" or not has_params:
            row = [path, str(tuple(leaf.shape)), leaf.dtype.name, f"{size:,}", human_bytes(nbytes)]
            rows.append(row + [labels.get(path, "")] if labels else row)
    header = ["path", "shape", "dtype", "values", "bytes"] + (["training"] if labels else [])
    text = table(rows, header, right=(3, 4))
    summary = [[g, f"{a:,}", f"{c:,}", human_bytes(b)] for g, (c, b, a) in groups.items()]
    all_count = sum(c for c, _, _ in groups.values())
    all_bytes = sum(b for _, b, _ in groups.values())
    summary.append(["total", f"{len(flat):,}", f"{all_count:,}", human_bytes(all_bytes)])
    hint = "" if show_all else "\n(only params are listed; --all lists every leaf)"
    return text + "\n\n" + table(summary, ["group", "arrays", "values", "bytes"], right=(1, 2, 3)) + hint


def training_table(report: Any, target: Any, labels: Mapping[str, str], freeze: str, multipliers: str) -> str:
    """Each target leaf with where the graft takes it from and how the optimizer treats it."""
    from jaxckpt.tree.treepath import flatten

    buckets = {}
    for bucket in ("loaded", "adapted", "mismatched", "missing", "skipped", "untouched"):
        buckets.update({entry.path: bucket for entry in getattr(report, bucket)})
    shapes = {p: leaf.shape for p, leaf in flatten(target).items()}
    rows = [[p, str(tuple(shapes[p])), buckets.get(p, ""), label] for p, label in labels.items()]
    lines = [f"training: optimizer.freeze={freeze!r} optimizer.lr_multipliers={multipliers!r}",
             table(rows, ["path", "shape", "graft", "training"]),
             training_summary(labels, {p: math.prod(shape) for p, shape in shapes.items()})]
    # Freezing a leaf the graft leaves fresh trains around random weights: almost always a mistake.
    fresh_frozen = [p for p, label in labels.items()
                    if label == "frozen" and buckets.get(p) not in ("loaded", "adapted")]
    if fresh_frozen:
        lines.append(f"warning: frozen but not loaded, so trained around its random initialisation: "
                     f"{', '.join(fresh_frozen)}")
    return "\n".join(lines)


def short_metrics(metrics: Mapping[str, Any], limit: int = 3) -> str:
    """A few metrics for a one-line listing: validation ones first (they rank checkpoints)."""
    finite = {k: v for k, v in metrics.items() if v is not None}
    val = {k: v for k, v in finite.items() if k.startswith("val/")}
    chosen = dict(list((val or finite).items())[:limit])
    more = len(val or finite) - len(chosen)
    return format_metrics(chosen) + (f" (+{more})" if more > 0 else "")
