"""Mapping rules of a graft (MMF's `pretrained_state_mapping`): which source path feeds each target path.

A rule `source_prefix -> target_prefix` grafts the source subtree under `source_prefix` onto the
target subtree under `target_prefix`; with rules, target leaves under no destination are
`untouched`. Every function here works on flat path lists, one `startswith` per path and rule.
"""

from typing import Mapping, Sequence

from jaxckpt.tree import treepath


def strip_prefix(prefix: str) -> str:
    """A prefix without surrounding blanks and separators."""
    return prefix.strip().strip(treepath.SEP)


def normalize_mapping(
    mapping: Mapping[str, str] | None,
) -> tuple[tuple[str, str], ...] | None:
    """Normalises a mapping to `((source_prefix, target_prefix), ...)`.

    Args:
        mapping: None (the whole tree onto itself) or a dict of source prefix to target prefix;
            an empty prefix is the root. (A config's `"src:dst,..."` string is parsed by
            `jaxckpt.config_strings.parse_mapping`.)

    Returns:
        The pairs, or None for the whole tree onto itself.

    Raises:
        TypeError: if `mapping` is a string or not a dict of strings.
        ValueError: if two rules share a source or a destination prefix.

    Example:
        >>> normalize_mapping({"bert/": "encoder", "cls/head": "head"})
        (('bert', 'encoder'), ('cls/head', 'head'))
    """
    if mapping is None:
        return None
    if not isinstance(mapping, Mapping):
        hint = (" (the 'src:dst,...' form is for configs and command lines: parse it with"
                " jaxckpt.config_strings.parse_mapping)") if isinstance(mapping, str) else ""
        raise TypeError(f"mapping must be None or a dict {{source_prefix: target_prefix}}, e.g."
                        f" {{'encoder': 'backbone'}}; got {mapping!r}{hint}.")
    pairs = []
    for src, dst in mapping.items():
        if not isinstance(src, str) or not isinstance(dst, str):
            raise TypeError(f"Mapping rule {src!r}: {dst!r} must map a path prefix"
                            " string to a path prefix string.")
        pairs.append((strip_prefix(src), strip_prefix(dst)))
    for side, name in ((0, "source"), (1, "target")):
        prefixes = [pair[side] for pair in pairs]
        dupes = sorted({p for p in prefixes if prefixes.count(p) > 1})
        if dupes:
            raise ValueError(f"Mapping {mapping!r} names the {name} prefix(es) {dupes}"
                             " in more than one rule; each may appear once.")
    return tuple(pairs)


def _top_level(paths: Sequence[str]) -> str:
    names = sorted({p.split(treepath.SEP, 1)[0] for p in paths})
    return "empty" if not names else "rooted at " + ", ".join(
        repr(n) for n in names[:12]) + (" ..." if len(names) > 12 else "")


def _any_under(paths: Sequence[str], prefix: str) -> bool:
    below = prefix + treepath.SEP
    return any(p.startswith(below) or p == prefix for p in paths) if prefix \
        else bool(paths)


def source_paths(rules, tgt_paths: Sequence[str]) -> list[str | None]:
    """Per target path, the source path it is grafted from (None: untouched).

    The most specific destination wins: rules go longest destination first, each
    filling the paths no earlier rule took. A path costs a `startswith` and a slice
    per rule (what `treepath.is_under` and `rebase` do, without their calls).
    """
    if rules is None:
        return list(tgt_paths)
    sources: list[str | None] = [None] * len(tgt_paths)
    for src, dst in sorted(rules, key=lambda pair: -len(pair[1])):
        below, cut = dst + treepath.SEP, len(dst) + 1 if dst else 0
        for i, path in enumerate(tgt_paths):
            if sources[i] is None and (not dst or path.startswith(below)
                                       or path == dst):
                rest = path[cut:]  # "" for the destination itself.
                sources[i] = (f"{src}{treepath.SEP}{rest}" if src and rest
                              else src or rest)
    return sources


def unused_sources(rules, src_paths: Sequence[str], used: bytearray) -> list[int]:
    """Indices of the source leaves in scope (under some mapping rule's source
    prefix) that no target leaf looked up, in order; the scope is only tested on
    the few not looked up."""
    not_used = [j for j, was_used in enumerate(used) if not was_used]
    prefixes = None if rules is None else {src for src, _ in rules}
    if prefixes is None or "" in prefixes:
        return not_used
    below = tuple(p + treepath.SEP for p in prefixes)
    return [j for j in not_used
            if src_paths[j].startswith(below) or src_paths[j] in prefixes]


def dead_rules(rules, src_paths, tgt_paths) -> list[str]:
    """Errors for mapping rules that match no source or no target path."""
    errors = []
    for src, dst in rules or ():
        if not _any_under(src_paths, src):
            errors.append(f"mapping rule {src!r}:{dst!r} matches no source path"
                          f" (source is {_top_level(src_paths)})")
        if not _any_under(tgt_paths, dst):
            errors.append(f"mapping rule {src!r}:{dst!r} matches no target path"
                          f" (target is {_top_level(tgt_paths)})")
    return errors
