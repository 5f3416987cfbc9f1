"""Optimizers from config: schedules, frozen parameters and per-path learning-rate multipliers.

Parameters are addressed by their tree path (`"encoder/Dense_0/kernel"`) and selected with regular
expressions that match a whole path or a whole ancestor (`jaxckpt.treepath` rules): `"encoder"`
selects everything under `encoder/`, `".*/bias"` every bias, `"head"` not `"lm_head"`. A `glob:`
prefix switches one pattern to glob syntax (`"glob:encoder/**"`). Each leaf gets one label:

* `"frozen"` if any `freeze` pattern matches it. Freezing wins over every multiplier.
* otherwise `"x<m>"` for the *first* `lr_multipliers` rule that matches it (`"x0.1"`); a multiplier
  of 0 is the same as freezing (`"frozen"`: no update and no optimizer moments), and 1 is `"train"`;
* otherwise `"train"`.

Every rule must label some leaf. A pattern that matches no path is an error, and so is a rule whose
every match an earlier rule already labels (`freeze=["encoder"]` with `lr_multipliers={"encoder": 0.1}`,
or `lr_multipliers=[(".*", 2), ("head", 5)]`): it would silently do nothing, so the error names it and the
rule that shadows it.

The labels drive `optax.multi_transform`: frozen leaves get `optax.set_to_zero()`, so their updates
are exactly zero (parameters stay bitwise unchanged) and the optimizer keeps no moments for them.
A multiplier group runs its own copy of the optimizer followed by `optax.scale(m)`. For the
optimizers built here (sgd, momentum, adam, adamw) that is exactly a learning rate of `m * lr`
for the group, weight decay included: optax multiplies decoupled weight decay by the learning rate.

The step count that drives the schedule lives in the optimizer state, so restoring a checkpointed
`opt_state` resumes the schedule where it stopped.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import optax

from jaxckpt import config_strings
from jaxckpt.tree import pathmatch, treepath
from jaxckpt.types import Params

FROZEN = "frozen"
"""Label of frozen leaves in `describe_trainable` and in the `optax.multi_transform` labels."""

TRAIN = "train"
"""Label of leaves trained at the base learning rate."""

FreezeSpec = Sequence[str] | None
"""A sequence of regexes (`["encoder", "fusion/Dense_0"]`); None freezes nothing."""

MultiplierSpec = Mapping[str, float] | Sequence[tuple[str, float]] | None
"""`{regex: mult}` or `[(regex, mult), ...]`; first match wins; None scales nothing."""

_OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")
_SCHEDULES = ("constant", "cosine", "warmup_cosine")


def _string_given(name: str, value: str, form: str, example: str, parser: str) -> TypeError:
    return TypeError(
        f"{name} must be {form}, e.g. {name}={example}; got the string {value!r} (the string form is for "
        f"configs and command lines: parse it with jaxckpt.config_strings.{parser})."
    )


def freeze_patterns(freeze: FreezeSpec) -> tuple[str, ...]:
    """Checks freeze patterns: a sequence of regexes, each of which must compile.

    Args:
        freeze: None (nothing frozen) or a sequence of regexes. (A config's comma-separated string
            is parsed by `jaxckpt.config_strings.parse_patterns`.)

    Returns:
        The patterns, in order.

    Raises:
        TypeError: if `freeze` is a string.
        ValueError: if a pattern is not a valid regular expression.

    Example:
        >>> freeze_patterns(["encoder", "fusion/Dense_0"])
        ('encoder', 'fusion/Dense_0')
    """
    if freeze is None:
        return ()
    if isinstance(freeze, str):
        raise _string_given("freeze", freeze, "a sequence of regexes", "['encoder/.*']", "parse_patterns")
    patterns = tuple(freeze)
    for pattern in patterns:
        _check_regex(pattern, "freeze")
    return patterns


def multiplier_rules(lr_multipliers: MultiplierSpec) -> tuple[tuple[str, float], ...]:
    """Checks learning-rate multiplier rules and returns them as `((regex, multiplier), ...)`.

    Args:
        lr_multipliers: None, `{regex: multiplier}` or a sequence of `(regex, multiplier)` pairs.
            (A config's `"regex:mult,..."` string is parsed by
            `jaxckpt.config_strings.parse_lr_multipliers`.)

    Returns:
        The rules in order (first match wins when labelling), multipliers as floats.

    Raises:
        TypeError: if `lr_multipliers` is a string.
        ValueError: if a multiplier is not a finite non-negative number, or a regex is invalid.

    Example:
        >>> multiplier_rules({"head": 10, "encoder/Dense_0": 0.1})
        (('head', 10.0), ('encoder/Dense_0', 0.1))
    """
    if lr_multipliers is None:
        return ()
    if isinstance(lr_multipliers, str):
        raise _string_given("lr_multipliers", lr_multipliers, "a dict {regex: multiplier} or (regex, multiplier) "
                            "pairs", "{'head/.*': 10.0}", "parse_lr_multipliers")
    pairs = list(lr_multipliers.items()) if isinstance(lr_multipliers, Mapping) else [tuple(p) for p in lr_multipliers]
    rules = []
    for pattern, mult in pairs:
        _check_regex(pattern, "lr_multipliers")
        try:
            value = float(mult)
        except (TypeError, ValueError):
            raise ValueError(
                f"lr_multipliers rule for {pattern!r}: multiplier {mult!r} is not a number "
                "(write e.g. 'head:0.1')."
            ) from None
        if not value >= 0 or value == float("inf"):
            raise ValueError(
                f"lr_multipliers rule for {pattern!r}: multiplier {value} must be finite and >= 0."
            )
        rules.append((pattern, value))
    return tuple(rules)


def trainable_labels(
    params: Params, freeze: FreezeSpec = None, lr_multipliers: MultiplierSpec = None
) -> Params:
    """Labels every leaf of `params` as `"frozen"`, `"x<m>"` or `"train"` (see module docstring).

    Args:
        params: the parameter tree (arrays or `jax.ShapeDtypeStruct`s).
        freeze: patterns of leaves to freeze (see `freeze_patterns`).
        lr_multipliers: multiplier rules (see `multiplier_rules`).

    Returns:
        A tree of the same structure as `params` whose leaves are label strings, ready for
        `optax.multi_transform`.

    Raises:
        ValueError: if a pattern matches no parameter path (the error names the pattern and lists
            the available paths), a rule labels no leaf because earlier rules already label all it
            matches (the error names both), or a specification is malformed.
    """
    frozen = freeze_patterns(freeze)
    mult_rules = multiplier_rules(lr_multipliers)
    rules = [(p, FROZEN) for p in frozen] + [(p, _mult_label(m)) for p, m in mult_rules]
    names = [f"freeze {p!r}" for p in frozen]
    names += [f"lr_multipliers '{p}:{m:g}'" for p, m in mult_rules]
    return _label_tree(params, rules, TRAIN, names, num_freeze=len(frozen))


def describe_trainable(
    params: Params, freeze: FreezeSpec = None, lr_multipliers: MultiplierSpec = None
) -> dict[str, str]:
    """What happens to each parameter: `{"encoder/Dense_0/kernel": "frozen" | "x0.1" | "train"}`.

    Args:
        params: the parameter tree (arrays or `jax.ShapeDtypeStruct`s).
        freeze: patterns of leaves to freeze (see `freeze_patterns`).
        lr_multipliers: multiplier rules (see `multiplier_rules`).

    Returns:
        A dict from tree path to label, in tree order.

    Raises:
        ValueError: as `trainable_labels`.

    Example:
        >>> describe_trainable({"enc": {"w": w}, "head": {"w": w}}, freeze=["enc"])
        {'enc/w': 'frozen', 'head/w': 'train'}
    """
    return treepath.flatten(trainable_labels(params, freeze, lr_multipliers))


def freeze_and_scale(
    tx: optax.GradientTransformation | Callable[[float], optax.GradientTransformation],
    params: Params,
    *,
    freeze: FreezeSpec = None,
    lr_multipliers: MultiplierSpec = None,
) -> optax.GradientTransformation:
    """Wraps an optimizer so that some leaves are frozen and others get scaled learning rates.

    Args:
        tx: the optimizer for trainable leaves, or a factory `multiplier -> optimizer` (use it for
            optimizers whose update is not linear in the learning rate: it is called once per
            label with that label's multiplier, `1.0` for `"train"`). A plain transformation is
            followed by `optax.scale(m)` in multiplier groups. Each label group keeps its own copy
            of the optimizer state, so a global-norm clip inside `tx` would see only its group:
            clip before this wrapper (as `make_optimizer` does).
        params: the parameter tree the optimizer will be initialised with (arrays or
            `jax.ShapeDtypeStruct`s); only its structure and paths are used.
        freeze: patterns of leaves to freeze (see `freeze_patterns`); freezing wins over multipliers.
        lr_multipliers: multiplier rules (see `multiplier_rules`); first match wins.

    Returns:
        An `optax.GradientTransformation` whose updates are exactly zero for frozen leaves and
        whose state holds no moments for them.

    Raises:
        ValueError: if a pattern matches no parameter path, a rule is shadowed by earlier ones (see
            `trainable_labels`), or a specification is malformed.

    Example:
        >>> tx = freeze_and_scale(optax.adam(1e-3), params, freeze=["encoder"],
        ...                       lr_multipliers={"head": 10.0})
        >>> opt_state = tx.init(params)
    """
    labels = trainable_labels(params, freeze, lr_multipliers)
    used = set(jax.tree.leaves(labels))
    if used == {TRAIN}:
        return tx if isinstance(tx, optax.GradientTransformation) else tx(1.0)
    transforms = {}
    for label in sorted(used):
        if label == FROZEN:
            transforms[label] = optax.set_to_zero()
        elif label == TRAIN:
            transforms[label] = _scaled(tx, 1.0)
        else:
            transforms[label] = _scaled(tx, float(label[1:]))
    return optax.multi_transform(transforms, labels)


def make_schedule(config: Any, *, num_steps: int) -> optax.Schedule:
    """The learning-rate schedule described by an optimizer config.

    Args:
        config: the `config.optimizer` section (an `ml_collections.ConfigDict` or a mapping) with
            `learning_rate`, `schedule` (`"constant" | "cosine" | "warmup_cosine"`),
            `warmup_steps` and `decay_steps` (0 means `num_steps`).
        num_steps: total training steps, the default length of the decay.

    Returns:
        A function `step -> learning rate`. `"constant"` with `warmup_steps > 0` warms up linearly
        from 0 and then stays constant; `"cosine"` decays from the peak to 0 over `decay_steps`
        (after the warm-up, if any); `"warmup_cosine"` warms up then decays, ending at step
        `decay_steps`.

    Raises:
        ValueError: for an unknown schedule name or inconsistent step counts.

    Example:
        >>> make_schedule(ConfigDict(dict(learning_rate=1e-3, schedule="cosine",
        ...                               warmup_steps=0, decay_steps=0)), num_steps=100)(100)
        Array(0., dtype=float32)
    """
    lr = float(_field(config, "learning_rate"))
    name = _field(config, "schedule", "constant")
    warmup = int(_field(config, "warmup_steps", 0))
    decay = int(_field(config, "decay_steps", 0)) or int(num_steps)
    if name not in _SCHEDULES:
        raise ValueError(f"optimizer.schedule={name!r} is unknown; use one of {_SCHEDULES}.")
    if warmup < 0 or decay <= 0:
        raise ValueError(
            f"optimizer.warmup_steps={warmup} must be >= 0 and the decay length ({decay}: "
            "optimizer.decay_steps, or num_steps when it is 0) must be > 0."
        )
    if name == "constant":
        if warmup == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    if name == "cosine" and warmup == 0:
        return optax.cosine_decay_schedule(lr, decay)
    if warmup >= decay:
        raise ValueError(
            f"optimizer.warmup_steps={warmup} must be smaller than the decay length {decay} "
            "(optimizer.decay_steps, or num_steps when it is 0)."
        )
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay)


def make_optimizer(config: Any, params: Params, *, num_steps: int) -> optax.GradientTransformation:
    """Builds the optimizer described by `config.optimizer` for `params`.

    The chain is: (frozen gradients zeroed) -> global-norm clip over trainable gradients ->
    `freeze_and_scale(optimizer)`. Weight decay applies to leaves with 2 or more dimensions
    (kernels, embeddings), not to biases or norm scales: decoupled for `adamw`, added to the
    gradient (L2) for `sgd`/`momentum`.

    Args:
        config: an `ml_collections.ConfigDict` (or mapping) with `name` (`"adam" | "adamw" | "sgd"
            | "momentum"`), `learning_rate`, `schedule`, `warmup_steps`, `decay_steps`,
            `weight_decay`, `grad_clip_norm` (0 = off), `freeze` and `lr_multipliers`
            (strings as `jaxckpt.config_strings` parses them); optional `momentum` (default 0.9,
            used by `"momentum"`), `b1`/`b2` (adam defaults).
        params: the parameter tree (arrays or `jax.ShapeDtypeStruct`s).
        num_steps: total training steps (the decay length when `decay_steps` is 0).

    Returns:
        An `optax.GradientTransformation`.

    Raises:
        ValueError: for an unknown optimizer or schedule, `weight_decay` with plain `adam`, or a
            freeze / multiplier rule that labels no parameter (it matches none, or earlier rules
            label all it matches).

    Example:
        >>> tx = make_optimizer(config.optimizer, params, num_steps=config.num_steps)
        >>> state = TrainState.create(params=params, tx=tx, ...)
    """
    name = _field(config, "name", "adam")
    if name not in _OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r} is unknown; use one of {_OPTIMIZERS}.")
    schedule = make_schedule(config, num_steps=num_steps)
    weight_decay = float(_field(config, "weight_decay", 0.0))
    if weight_decay and name == "adam":
        raise ValueError(
            "optimizer.weight_decay is set with name='adam'; use name='adamw' for decoupled weight "
            "decay, or set weight_decay=0."
        )
    clip = float(_field(config, "grad_clip_norm", 0.0))
    freeze = config_strings.parse_patterns(_field(config, "freeze", ""))
    multipliers = _field(config, "lr_multipliers", "")
    try:
        rules = config_strings.parse_lr_multipliers(multipliers)
        labels = trainable_labels(params, freeze, rules)
    except ValueError as e:
        # Name the config fields, so a command-line user knows which flag to fix.
        raise ValueError(
            f"optimizer.freeze={','.join(freeze)!r} optimizer.lr_multipliers={multipliers!r}: {e}"
        ) from None
    decay_mask = jax.tree.map(lambda p: len(p.shape) >= 2, params)

    def base(multiplier: float) -> optax.GradientTransformation:
        lr = _scaled_schedule(schedule, multiplier)
        if name == "adam" or name == "adamw":
            b1, b2 = float(_field(config, "b1", 0.9)), float(_field(config, "b2", 0.999))
            if name == "adam":
                return optax.adam(lr, b1=b1, b2=b2)
            return optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
        momentum = float(_field(config, "momentum", 0.9)) if name == "momentum" else None
        sgd = optax.sgd(lr, momentum=momentum)
        if not weight_decay:
            return sgd
        return optax.chain(optax.add_decayed_weights(weight_decay, decay_mask), sgd)

    parts = []
    if clip > 0:
        if FROZEN in jax.tree.leaves(labels):
            # Frozen gradients must not count towards the global norm that scales the others.
            frozen_mask = jax.tree.map(lambda label: label == FROZEN, labels)
            parts.append(optax.masked(optax.set_to_zero(), frozen_mask))
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(freeze_and_scale(base, params, freeze=freeze, lr_multipliers=rules))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


def _scaled_schedule(schedule: optax.Schedule, multiplier: float) -> optax.ScalarOrSchedule:
    if multiplier == 1.0:
        return schedule
    return lambda step: multiplier * schedule(step)


def _scaled(
    tx: optax.GradientTransformation | Callable[[float], optax.GradientTransformation], multiplier: float
) -> optax.GradientTransformation:
    if not isinstance(tx, optax.GradientTransformation):
        return tx(multiplier)
    if multiplier == 1.0:
        return tx
    return optax.chain(tx, optax.scale(multiplier))


def _mult_label(multiplier: float) -> str:
    # A multiplier of exactly 1 is the base rate: share the "train" group (and its state).
    if multiplier == 1.0:
        return TRAIN
    # 0 never moves the leaf: freeze it rather than keep optimizer moments that cannot matter.
    if multiplier == 0.0:
        return FROZEN
    text = f"{multiplier:g}"
    # The label is parsed back into the multiplier: keep every digit when `:g` would round.
    return f"x{text if float(text) == multiplier else repr(multiplier)}"


def _field(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    if value is None and default is None:
        raise ValueError(f"optimizer config has no field {name!r}; add it to config.optimizer.")
    return value


def _check_regex(pattern: str, where: str) -> None:
    try:
        pathmatch.compile_pattern(pattern, syntax="regex")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _label_tree(tree: Params, rules: list[tuple[str, str]], default: str, names: list[str], *,
                num_freeze: int) -> Params:
    """`pathmatch.label_tree` (first match wins), refusing rules that would label no leaf.

    `names[i]` says how the user wrote `rules[i]` (`"freeze 'encoder'"`), for the errors; the first
    `num_freeze` rules are freeze patterns, the rest multipliers.
    """
    patterns = [pattern for pattern, _ in rules]
    paths = treepath.tree_paths(tree)
    unmatched = pathmatch.unmatched_patterns(paths, patterns, syntax="regex")
    if unmatched:
        shown = ", ".join(paths[:20]) + (", ..." if len(paths) > 20 else "")
        raise ValueError(
            f"freeze/lr_multipliers pattern(s) {unmatched} match no parameter path. Patterns are "
            f"regexes matching a whole path or a whole ancestor (e.g. 'encoder', '.*/bias'); "
            f"paths are: {shown}"
        )
    matcher = pathmatch.PathMatcher(patterns, syntax="regex")
    winner = {path: matcher.first(path) for path in paths}
    labelling = set(winner.values())
    problems = []
    for i in (i for i in range(len(rules)) if i not in labelling):
        matched = pathmatch.PathMatcher([patterns[i]], syntax="regex").filter(paths)
        earlier = sorted({winner[path] for path in matched})
        shown = ", ".join(matched[:5]) + (", ..." if len(matched) > 5 else "")
        if i >= num_freeze and all(j < num_freeze for j in earlier):
            fix = "freezing wins over every multiplier: drop this rule or narrow the freeze pattern"
        elif i < num_freeze:
            fix = "it adds nothing: drop it"
        else:
            fix = "the first matching rule wins: put this rule before the one shadowing it, or drop it"
        problems.append(
            f"{names[i]} labels no parameter: every path it matches ({shown}) is already labelled by "
            f"the earlier {' and '.join(names[j] for j in earlier)}; {fix}."
        )
    if problems:
        raise ValueError(" ".join(problems))
    return pathmatch.label_tree(tree, rules, default, syntax="regex")
