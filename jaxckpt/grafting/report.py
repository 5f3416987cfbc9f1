"""Where every leaf of a graft went: `GraftReport` and its `GraftEntry`s.

`jaxckpt.grafting.graft.graft` and `jaxckpt.grafting.graft.plan` build these; this module only
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
        rule: the skip pattern or adapter that decided it, or the structural rule that made its
            source leaf (e.g. `"split 3 on axis 1 of h_0/c_attn/kernel (part 0)"`).
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
_MEANING = {
    "loaded": "copied from the source",
    "adapted": "reshaped on purpose by an adapter rule",
    "mismatched": "shapes differ: kept fresh",
    "missing": "no source leaf: kept fresh",
    "skipped": "kept fresh by a skip rule",
    "untouched": "outside the mapped prefixes: kept fresh",
    "unused": "source leaves no target leaf takes",
    "cast": "dtype cast while loading",
}


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
            " 'dst_prefix'}; keep target leaves fresh with"
            " skip=[regex, ...]; or change shapes on purpose with"
            " adapters={regex: 'resize' | 'interpolate' | fn}.")

    def __str__(self) -> str:
        """An aligned table, one row per leaf, then one line per bucket count.

        Columns: bucket, path, source path (where it differs from the path; the
        column is left out when no leaf's does), shapes. Loaded leaves are cut to
        the first few when there are many.

        Example:
            >>> print(GraftReport(
            ...     loaded=(GraftEntry("encoder/Dense_0/kernel", "encoder/Dense_0/kernel",
            ...                        (64, 128), (64, 128)),),
            ...     mismatched=(GraftEntry("head/kernel", "head/kernel", (128, 10),
            ...                            (128, 2)),)))
            GraftReport
              bucket      path                    shapes
              loaded      encoder/Dense_0/kernel  (64, 128)
              mismatched  head/kernel             source (128, 10) -> target (128, 2)
            loaded 1      copied from the source
            adapted 0     reshaped on purpose by an adapter rule
            mismatched 1  shapes differ: kept fresh
            missing 0     no source leaf: kept fresh
            skipped 0     kept fresh by a skip rule
            untouched 0   outside the mapped prefixes: kept fresh
            unused 0      source leaves no target leaf takes
            cast 0        dtype cast while loading
        """
        return self.format()

    def format(self, *, every_leaf: bool = False) -> str:
        """The table `str(report)` gives; with `every_leaf`, no loaded leaf is cut.

        Args:
            every_leaf: list every loaded leaf (a plan shows it all); otherwise more than 20 are
                cut to the first 10 and a count.

        Returns:
            The aligned table and the bucket counts.
        """
        rows = self._rows(every_leaf)
        lines = ["GraftReport"]
        if rows:
            rows.insert(0, ("bucket", "path", "source", "shapes"))
            if not any(row[2] for row in rows[1:]):  # No leaf comes from another path.
                rows = [(bucket, path, shapes) for bucket, path, _, shapes in rows]
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
            lines += [("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths))
                       + "  " + row[-1]).rstrip() for row in rows]
        counts = [(f"{name} {n}", _MEANING[name]) for name, n in self.counts.items()]
        width = max(len(count) for count, _ in counts)
        lines += [f"{count.ljust(width)}  {meaning}" for count, meaning in counts]
        return "\n".join(lines)

    def _rows(self, every_leaf: bool = False) -> list[tuple[str, str, str, str]]:
        """(bucket, path, source, shapes) per entry, for `__str__`."""
        def source(e: GraftEntry) -> str:
            return e.source if e.source not in (None, e.path) else ""

        # Leaves a structural rule made are always listed: they are the ones worth checking.
        made = [e for e in self.loaded if e.rule]
        plain = [e for e in self.loaded if not e.rule]
        shown = plain[:_LOADED_SHOWN] if len(plain) > 2 * _LOADED_SHOWN and not every_leaf else plain
        rows = [("loaded", e.path, source(e), f"{e.target_shape}") for e in shown]
        if len(shown) < len(plain):
            rows.append(("loaded", "...", "", f"and {len(plain) - len(shown)} more"))
        rows += [("loaded", e.path, source(e), f"{e.target_shape} by {e.rule}") for e in made]
        rows += [("adapted", e.path, source(e),
                  f"source {e.source_shape} -> target {e.target_shape} by {e.rule}")
                 for e in self.adapted]
        rows += [("mismatched", e.path, source(e),
                  f"source {e.source_shape} -> target {e.target_shape}")
                 for e in self.mismatched]
        rows += [("missing", e.path, source(e), f"target {e.target_shape}, no source leaf")
                 for e in self.missing]
        rows += [("skipped", e.path, source(e), f"{e.target_shape} by skip {e.rule!r}")
                 for e in self.skipped]
        rows += [("untouched", e.path, "", f"{e.target_shape}") for e in self.untouched]
        rows += [("unused", e.path, "", f"source {e.source_shape}, no target leaf")
                 for e in self.unused]
        rows += [("cast", e.path, source(e), f"{e.source_dtype} -> {e.target_dtype}")
                 for e in self.cast]
        return rows

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able dicts and lists."""
        out: dict[str, Any] = {"counts": self.counts, "ok": self.ok}
        for name in _BUCKETS:
            out[name] = [e.to_dict() for e in getattr(self, name)]
        return out

