"""Glob and regex matching over tree paths (`"encoder/Dense_0/kernel"`, see `jaxckpt.treepath`).

Patterns name a leaf *or a whole subtree*: a pattern matches a path when it
matches the entire path or the entire path of one of its ancestors (cut at a
`/`). So `"head"` matches `"head/kernel"` but not `"lm_head/kernel"`, and
`"head/ker"` matches nothing. Two syntaxes:

* glob (default here): `*` is any run of characters inside one name, `**` any
  run crossing `/` (`**/` also matches zero names), `?` one character inside a
  name; everything else is literal. `"*/kernel"`, `"encoder/**"`.
* regex: Python `re` syntax, applied with `re.fullmatch` under the same
  whole-path-or-ancestor rule. `"encoder/layer_[0-3]"`, `".*/bias"`.

A `re:` or `glob:` prefix on a pattern picks its syntax whatever the caller's
default (`graft` takes regexes by default, as its `skip` rules are regexes).
"""

import functools
import re
from typing import Any, Iterable, Mapping, Sequence

from jaxckpt.tree.treepath import SEP, flatten_with_treedef, preview
from jaxckpt.types import PyTree

_SYNTAXES = ("glob", "regex")


def _glob_to_regex(glob: str) -> str:
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append(f"(?:.*{SEP})?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append(f"[^{SEP}]*")
            i += 1
        elif glob[i] == "?":
            out.append(f"[^{SEP}]")
            i += 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str, *, syntax: str = "glob") -> re.Pattern[str]:
    """Compiles a glob or regex path pattern (see the module docstring).

    The result is meant for `.fullmatch(path)`: it accepts the path or any path
    below one the pattern names.

    Args:
        pattern: the pattern; a `re:` or `glob:` prefix overrides `syntax`.
        syntax: `"glob"` or `"regex"`, for patterns without a prefix.

    Returns:
        A compiled regular expression.

    Raises:
        ValueError: for an empty pattern, an unknown syntax or a bad regex.

    Example:
        >>> bool(compile_pattern("*/kernel").fullmatch("dense/kernel"))
        True
    """
    if syntax not in _SYNTAXES:
        raise ValueError(f"Unknown pattern syntax {syntax!r}; use one of {_SYNTAXES}.")
    body = pattern
    if pattern.startswith("re:"):
        syntax, body = "regex", pattern[3:]
    elif pattern.startswith("glob:"):
        syntax, body = "glob", pattern[5:]
    if not body:
        raise ValueError(f"Empty path pattern {pattern!r}; to name the whole tree"
                         " use '**' (glob) or 're:.*'.")
    if syntax == "glob":
        body = _glob_to_regex(body)
    try:
        return re.compile(f"(?:{body})(?:{SEP}.*)?", re.DOTALL)
    except re.error as e:
        raise ValueError(f"Path pattern {pattern!r} is not a valid regex: {e}."
                         " Prefix it with 'glob:' if it is a glob.") from e


class PathMatcher:
    """A list of patterns compiled once, answering which one matches a path.

    Attributes:
        patterns: the patterns as given.

    Example:
        >>> m = PathMatcher(["head", "*/bias"])
        >>> m.first("head/kernel"), m.first("dense/bias"), m.first("dense/kernel")
        (0, 1, None)
    """

    def __init__(self, patterns: Sequence[str], *, syntax: str = "glob"):
        if isinstance(patterns, str):
            raise TypeError(f"Expected a sequence of patterns, got the string"
                            f" {patterns!r}; wrap it in a list.")
        self.patterns = tuple(patterns)
        self._fullmatch = [compile_pattern(p, syntax=syntax).fullmatch
                           for p in self.patterns]
        # One pattern is the usual case: matched without the loop (half the cost).
        self._only = self._fullmatch[0] if len(self._fullmatch) == 1 else None

    def first(self, path: str) -> int | None:
        """Index of the first pattern matching `path`, or None."""
        if self._only is not None:
            return None if self._only(path) is None else 0
        for index, fullmatch in enumerate(self._fullmatch):
            if fullmatch(path) is not None:
                return index
        return None

    def __call__(self, path: str) -> bool:
        """Whether any pattern matches `path`."""
        return self.first(path) is not None

    def filter(self, paths: Iterable[str]) -> list[str]:
        """The paths any pattern matches, in order."""
        return [p for p in paths if self.first(p) is not None]

    def unmatched(self, paths: Iterable[str]) -> list[str]:
        """The patterns that match none of `paths`, in order."""
        waiting = dict(enumerate(self._fullmatch))
        for path in paths:
            if not waiting:
                break
            for index in [i for i, fm in waiting.items() if fm(path) is not None]:
                del waiting[index]
        return [self.patterns[i] for i in waiting]


def match(paths: Iterable[str], pattern: str, *,
          syntax: str = "glob") -> list[str]:
    """The paths a pattern matches, in order.

    A pattern matches a path when it matches the whole path or the whole path of
    one of its ancestors (see the module docstring), so `"enc"` matches
    `"enc/kernel"` but not `"encoder/kernel"`.

    Args:
        paths: the paths to filter, e.g. `flatten(params).keys()`.
        pattern: a glob or regex pattern; a `re:` or `glob:` prefix overrides
            `syntax`.
        syntax: `"glob"` (default) or `"regex"`, for a pattern without a prefix.

    Returns:
        The paths the pattern matches, in the order of `paths` (empty if none).

    Raises:
        ValueError: for an empty pattern, an unknown syntax or a bad regex.

    Example:
        >>> match(["enc/kernel", "enc/bias", "head/kernel"], "*/kernel")
        ['enc/kernel', 'head/kernel']
    """
    return PathMatcher([pattern], syntax=syntax).filter(paths)


def unmatched_patterns(paths: Iterable[str], patterns: Sequence[str], *,
                       syntax: str = "glob") -> list[str]:
    """The patterns that match none of `paths` (to raise "matches nothing").

    Example:
        >>> unmatched_patterns(["enc/kernel"], ["enc", "dec"])
        ['dec']
    """
    return PathMatcher(patterns, syntax=syntax).unmatched(paths)


def label_tree(
    tree: PyTree,
    rules: Sequence[tuple[str, Any]] | Mapping[str, Any],
    default: Any,
    *,
    syntax: str = "glob",
) -> PyTree:
    """A tree of labels shaped like `tree`: the first matching rule wins.

    Made for `optax.multi_transform(transforms, param_labels=...)`.

    Args:
        tree: the tree to label (arrays or `jax.ShapeDtypeStruct`s).
        rules: `(pattern, label)` pairs in priority order, or an ordered mapping.
        default: label for leaves no rule matches; None makes such leaves an error.
        syntax: `"glob"` or `"regex"` for patterns without a `re:`/`glob:` prefix.

    Returns:
        A tree with the structure of `tree` whose leaves are labels.

    Raises:
        ValueError: if `default` is None and some leaf matches no rule.

    Example:
        >>> label_tree({"enc": {"w": 1}, "head": {"w": 2}}, [("enc", "frozen")],
        ...            "train")
        {'enc': {'w': 'frozen'}, 'head': {'w': 'train'}}
    """
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    matcher = PathMatcher([p for p, _ in pairs], syntax=syntax)
    paths, _, treedef = flatten_with_treedef(tree)
    labels, unlabelled = [], []
    for path in paths:
        index = matcher.first(path)
        if index is None:
            unlabelled.append(path)
            labels.append(default)
        else:
            labels.append(pairs[index][1])
    if default is None and unlabelled:
        raise ValueError(
            f"No rule labels these paths: {preview(unlabelled)}. Add a rule for"
            " them or pass a default label.")
    return treedef.unflatten(labels)
