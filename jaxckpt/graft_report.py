"""Where every leaf of a graft went: `GraftReport` and its `GraftEntry`s.

`jaxckpt.graft.graft` and `jaxckpt.graft.plan` build these; this module only
holds, checks and formats them.
"""

import dataclasses
from typing import Any, NamedTuple

_LOADED_SHOWN = 10  # str(report) lists loaded leaves only up to this many.


class GraftEntry(NamedTuple):
    """One leaf in a `GraftReport` bucket.

    Attributes:
        path: the target path (for `unused`, the source path).
        source: the source path it came from or was looked up at.
        source_shape: shape of the source leaf, when there is one.
        target_shape: shape of the target leaf, when there is one.
        source_dtype: dtype name of the source leaf.
        target_dtype: dtype name of the target leaf.
        rule: the skip pattern or adapter name that decided it.
    """
    path: str
    source: str | None = None
    source_shape: tuple[int, ...] | None = None
    target_shape: tuple[int, ...] | None = None
    source_dtype: str | None = None
    target_dtype: str | None = None
    rule: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The entry as JSON-able values (shapes as lists)."""
        out = self._asdict()
        for key in ("source_shape", "target_shape"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out


_BUCKETS = ("loaded", "adapted", "mismatched", "missing", "skipped",
            "untouched", "unused", "cast")


@dataclasses.dataclass(frozen=True)
class GraftReport:
    """Where every leaf of a graft went, one bucket per target leaf.

    Each target leaf is in exactly one of the first six buckets; `unused` holds
    source leaves and `cast` repeats loaded or adapted leaves whose dtype changed.

    Attributes:
        loaded: copied from the source (cast to the target dtype if needed).
        adapted: shapes differ and an adapter rule reshaped it on purpose.
        mismatched: shapes differ: kept fresh at the target shape.
        missing: no source leaf at the mapped path: kept fresh.
        skipped: a `skip` rule keeps it fresh.
        untouched: outside every mapped destination: kept fresh, not a problem.
        unused: source leaves in scope that no target leaf takes.
        cast: loaded or adapted leaves whose dtype was cast.

    Example:
        >>> report = GraftReport(loaded=(GraftEntry("w", "w", (2,), (2,)),))
        >>> report.counts["loaded"], report.ok
        (1, True)
    """
    loaded: tuple[GraftEntry, ...] = ()
    adapted: tuple[GraftEntry, ...] = ()
    mismatched: tuple[GraftEntry, ...] = ()
    missing: tuple[GraftEntry, ...] = ()
    skipped: tuple[GraftEntry, ...] = ()
    untouched: tuple[GraftEntry, ...] = ()
    unused: tuple[GraftEntry, ...] = ()
    cast: tuple[GraftEntry, ...] = ()

    @property
    def counts(self) -> dict[str, int]:
        """Number of entries per bucket."""
        return {name: len(getattr(self, name)) for name in _BUCKETS}

    @property
    def ok(self) -> bool:
        """True when nothing is missing, mismatched or unused."""
        return not (self.missing or self.mismatched or self.unused)

    def problems(self) -> str:
        """The missing, mismatched and unused leaves, one line each."""
        lines = []
        if self.missing:
            lines.append("missing (target leaf with no source leaf; kept fresh):")
            lines += [f"  {e.path}: target {e.target_shape} {e.target_dtype}, no"
                      f" source leaf at {e.source!r}" for e in self.missing]
        if self.mismatched:
            lines.append("mismatched (shapes differ; kept fresh, never reshaped):")
            lines += [f"  {e.path}: source {e.source!r} {e.source_shape} vs target"
                      f" {e.target_shape}" for e in self.mismatched]
        if self.unused:
            lines.append("unused (source leaf no target leaf takes):")
            lines += [f"  {e.path}: source {e.source_shape} {e.source_dtype}"
                      for e in self.unused]
        return "\n".join(lines)

    def check(self) -> None:
        """Raises the strict-mode error unless `ok`.

        Raises:
            ValueError: listing every missing, mismatched and unused path with
                shapes, and how to proceed.
        """
        if self.ok:
            return
        c = self.counts
        raise ValueError(
            f"graft(strict=True) found {c['missing']} missing, {c['mismatched']}"
            f" mismatched and {c['unused']} unused leaves:\n{self.problems()}\n"
            "To proceed: pass strict=False to keep these target leaves fresh and"
            " get the report; restrict what is grafted with mapping={'src_prefix':"
            " 'dst_prefix'} (or 'src:dst,...'); keep target leaves fresh with"
            " skip=[regex, ...]; or change shapes on purpose with"
            " adapters={regex: 'resize' | 'interpolate' | fn}.")

    def __str__(self) -> str:
        c = self.counts
        lines = ["GraftReport: " + ", ".join(f"{n} {c[n]}" for n in _BUCKETS)]
        shown = self.loaded[:_LOADED_SHOWN] if len(self.loaded) > 2 * _LOADED_SHOWN \
            else self.loaded
        for e in shown:
            renamed = f" <- {e.source}" if e.source != e.path else ""
            lines.append(f"  loaded     {e.path}{renamed} {e.target_shape}")
        if len(shown) < len(self.loaded):
            lines.append(f"  loaded     ... and {len(self.loaded) - len(shown)} more")
        for e in self.adapted:
            lines.append(f"  adapted    {e.path} <- {e.source} {e.source_shape} ->"
                         f" {e.target_shape} by {e.rule}")
        for e in self.mismatched:
            lines.append(f"  mismatched {e.path} <- {e.source} source"
                         f" {e.source_shape} target {e.target_shape}")
        for e in self.missing:
            lines.append(f"  missing    {e.path} {e.target_shape} (no {e.source})")
        for e in self.skipped:
            lines.append(f"  skipped    {e.path} {e.target_shape} by {e.rule!r}")
        for e in self.untouched:
            lines.append(f"  untouched  {e.path} {e.target_shape}")
        for e in self.unused:
            lines.append(f"  unused     {e.path} {e.source_shape} (source)")
        for e in self.cast:
            lines.append(f"  cast       {e.path} {e.source_dtype} -> {e.target_dtype}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able dicts and lists."""
        out: dict[str, Any] = {"counts": self.counts, "ok": self.ok}
        for name in _BUCKETS:
            out[name] = [e.to_dict() for e in getattr(self, name)]
        return out

