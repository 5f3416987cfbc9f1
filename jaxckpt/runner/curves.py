"""`curves.png`: loss and a main metric per split against step, drawn from `metrics.jsonl`.

matplotlib is imported inside `plot_curves`, so importing the runner does not import it. Both paths
may be `gs://` / `s3://` URLs (the PNG is then drawn locally and uploaded in one PUT).

Example:

    plot_curves(workdir / "metrics.jsonl", workdir / "curves.png", main_metric="accuracy")
"""

from __future__ import annotations

import os
from typing import Any

from jaxckpt.checkpoint.storage import AnyPath
from jaxckpt.runner.metrics_jsonl import atomic_write, read_metrics
from jaxckpt.runner.rundir import run_file

PathLike = str | os.PathLike[str]

_SPLIT_STYLES = {"train": dict(color="tab:blue", alpha=0.8), "val": dict(color="tab:orange", marker="o")}


def _draw_panel(axes, points: list[dict[str, Any]], metric: str) -> None:
    """Draws `metric` against step, one line per split, on `axes`."""
    present = {p.get("split", "?") for p in points if metric in p}
    # train and val first, in that order, then any other split alphabetically.
    splits = [s for s in _SPLIT_STYLES if s in present] + sorted(present - set(_SPLIT_STYLES))
    for split in splits:
        series = sorted((p["step"], p[metric]) for p in points if p.get("split", "?") == split and metric in p)
        steps, values = zip(*series)
        style = dict(_SPLIT_STYLES.get(split, {}))
        if len(series) > 50:
            style.pop("marker", None)
        axes.plot(steps, values, label=split, markersize=3, **style)
    axes.set_title(metric)
    axes.set_xlabel("step")
    axes.grid(True, alpha=0.3)
    if splits:
        axes.legend()
    else:
        axes.text(0.5, 0.5, f"no {metric!r} logged yet", ha="center", va="center",
                  transform=axes.transAxes, color="gray")


def _pick_metric(points: list[dict[str, Any]]) -> str:
    """The second panel's metric when none is named: accuracy if logged, else the first other val metric."""
    names = [k for p in points if p.get("split") == "val" for k in p if k not in _NOT_METRICS]
    names += [k for p in points for k in p if k not in _NOT_METRICS + ("grad_norm",)]
    return "accuracy" if "accuracy" in names else (names[0] if names else "accuracy")


_NOT_METRICS = ("step", "split", "loss", "num_examples")


def plot_curves(metrics_path: PathLike, out_png: PathLike, *, main_metric: str | None = None) -> AnyPath:
    """Draws `curves.png`: loss per split against step, and `main_metric` per split against step.

    Cheap enough to call at every evaluation: it uses the Agg canvas directly (no display, no pyplot
    global state) and replaces the PNG atomically, so a viewer never sees a half-written image.
    Panels without data say so instead of failing (e.g. before the first evaluation).

    Args:
        metrics_path: the run's `metrics.jsonl`.
        out_png: where to write the figure.
        main_metric: the metric of the second panel; with `main_metric="loss"` only one panel is drawn;
            None picks `accuracy` when it is logged, else the first other validation metric (e.g.
            perplexity for a language model).

    Returns:
        The path of the written PNG.

    Raises:
        ValueError: if `metrics_path` holds a line that is not a JSON metric point.

    Example:

        plot_curves(workdir / "metrics.jsonl", workdir / "curves.png", main_metric="accuracy")
    """
    # Figure + FigureCanvasAgg rather than pyplot: no backend selection, safe off the main thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = read_metrics(metrics_path)
    main_metric = main_metric or _pick_metric(points)
    metrics = ["loss"] if main_metric == "loss" else ["loss", main_metric]
    figure = Figure(figsize=(5.5 * len(metrics), 4), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, metric in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics):
        _draw_panel(axes, points, metric)
    out_png = run_file(out_png)
    atomic_write(out_png, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return out_png
