"""Tests for jaxckpt.train.optim: freezing, learning-rate multipliers, schedules, config parsing."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxckpt import config_strings
from jaxckpt.train import optim


def _params():
    rng = np.random.default_rng(0)
    def dense(i, o):
        return {"kernel": jnp.asarray(rng.normal(size=(i, o)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=(o,)), jnp.float32)}
    return {
        "encoder": {"Dense_0": dense(64, 32), "Dense_1": dense(32, 32)},
        "fusion": {"Dense_0": dense(32, 16)},
        "head": {"Dense_0": dense(16, 10)},
    }


def _grads(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def _config(**overrides):
    config = ml_collections.ConfigDict(dict(
        name="adam", learning_rate=1e-2, schedule="constant", warmup_steps=0, decay_steps=0,
        weight_decay=0.0, grad_clip_norm=0.0, freeze="", lr_multipliers="",
    ))
    config.update(overrides)
    return config


def _run(tx, params, steps=3):
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for i in range(steps):
        params, opt_state = step(params, opt_state, _grads(params, seed=i))
    return params, opt_state


def _state_bytes(opt_state):
    return sum(x.nbytes for x in jax.tree.leaves(opt_state) if hasattr(x, "nbytes"))


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "momentum"])
def test_frozen_leaves_are_bitwise_unchanged_after_jitted_updates(name):
    params = _params()
    tx = optim.make_optimizer(
        _config(name=name, freeze="encoder", weight_decay=0.1 if name != "adam" else 0.0,
                grad_clip_norm=1.0), params, num_steps=10)
    new, _ = _run(tx, params)
    for path, label in optim.describe_trainable(params, ["encoder"]).items():
        old_leaf, new_leaf = _leaf(params, path), _leaf(new, path)
        if label == "frozen":
            assert np.array_equal(np.asarray(old_leaf), np.asarray(new_leaf)), path
        else:
            assert not np.array_equal(np.asarray(old_leaf), np.asarray(new_leaf)), path


def _leaf(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def test_frozen_leaves_have_no_optimizer_state():
    params = _params()
    tx = optim.freeze_and_scale(optax.adam(1e-3), params, freeze=["encoder"])
    opt_state = tx.init(params)
    full = optax.adam(1e-3).init(params)
    frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(params["encoder"]))
    # Adam keeps two moments per trainable leaf; frozen leaves must cost nothing.
    assert _state_bytes(full) - _state_bytes(opt_state) == 2 * frozen_bytes
    moments = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
               if isinstance(s, optax.ScaleByAdamState)]
    assert moments
    for state in moments:
        assert isinstance(state.mu["encoder"]["Dense_0"]["kernel"], optax.MaskedNode)
        assert isinstance(state.nu["encoder"]["Dense_1"]["bias"], optax.MaskedNode)


def test_multipliers_scale_sgd_updates_exactly():
    params = _params()
    grads = _grads(params)
    tx = optim.freeze_and_scale(optax.sgd(0.5), params, lr_multipliers={"head": 0.25, "fusion": 2})
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    base, _ = optax.sgd(0.5).update(grads, optax.sgd(0.5).init(params), params)
    factors = {"encoder": 1.0, "fusion": 2.0, "head": 0.25}
    for top, factor in factors.items():
        for u, b in zip(jax.tree.leaves(updates[top]), jax.tree.leaves(base[top])):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(b) * np.float32(factor))


def test_multiplier_equals_scaled_learning_rate_for_adamw():
    params = _params()
    config = _config(name="adamw", weight_decay=0.1, lr_multipliers="head:0.1")
    new, _ = _run(optim.make_optimizer(config, params, num_steps=10), params)
    ref, _ = _run(optax.adamw(1e-3, weight_decay=0.1, mask=jax.tree.map(lambda p: p.ndim >= 2, params)),
                  params)
    np.testing.assert_allclose(np.asarray(new["head"]["Dense_0"]["kernel"]),
                               np.asarray(ref["head"]["Dense_0"]["kernel"]), rtol=1e-6, atol=1e-7)


def test_freeze_wins_over_multipliers_and_first_multiplier_wins():
    params = _params()
    described = optim.describe_trainable(
        params, freeze=["encoder/Dense_0"], lr_multipliers={"head/Dense_0/bias": 3, "encoder|head": 0.1})
    assert described["encoder/Dense_0/kernel"] == "frozen"
    assert described["encoder/Dense_1/kernel"] == "x0.1"
    assert described["head/Dense_0/bias"] == "x3"
    assert described["head/Dense_0/kernel"] == "x0.1"
    assert described["fusion/Dense_0/kernel"] == "train"
    assert list(described) == sorted(described)


def test_unmatched_patterns_are_errors_naming_the_pattern():
    params = _params()
    with pytest.raises(ValueError, match="decoder"):
        optim.freeze_and_scale(optax.sgd(1.0), params, freeze=["encoder", "decoder"])
    with pytest.raises(ValueError, match="backbone"):
        optim.make_optimizer(_config(lr_multipliers="backbone:0.1"), params, num_steps=10)


@pytest.mark.parametrize("freeze, multipliers, message", [
    ("encoder", "encoder:0.1",
     r"lr_multipliers 'encoder:0.1' labels no parameter: every path it matches \(encoder/Dense_0/bias, .*\) "
     r"is already labelled by the earlier freeze 'encoder'; freezing wins over every multiplier"),
    ("", ".*:2,head:5",
     r"lr_multipliers 'head:5' labels no parameter: every path it matches \(head/Dense_0/bias, "
     r"head/Dense_0/kernel\) is already labelled by the earlier lr_multipliers '.\*:2'; the first matching "
     r"rule wins: put this rule before"),
    ("encoder,encoder/Dense_1", "", r"freeze 'encoder/Dense_1' labels no parameter.*earlier freeze 'encoder'"),
    ("encoder", "fusion|head:2,.*/bias:0.5",
     r"lr_multipliers '.\*/bias:0.5' .*earlier freeze 'encoder' and lr_multipliers 'fusion\|head:2'"),
])
def test_a_rule_that_earlier_rules_shadow_is_an_error_naming_both(freeze, multipliers, message):
    params = _params()
    with pytest.raises(ValueError, match=message):
        optim.describe_trainable(params, config_strings.parse_patterns(freeze),
                                 config_strings.parse_lr_multipliers(multipliers))
    # The config path names the fields to fix, too.
    with pytest.raises(ValueError, match=r"optimizer\.freeze=.*optimizer\.lr_multipliers=.*labels no parameter"):
        optim.make_optimizer(_config(freeze=freeze, lr_multipliers=multipliers), params, num_steps=10)


def test_partly_shadowed_rules_are_fine():
    # Each rule still labels something: 'encoder|head' labels encoder/Dense_1 and head, '.*:2' fusion.
    described = optim.describe_trainable(_params(), freeze=["encoder/Dense_0"],
                                         lr_multipliers=[("encoder|head", 0.1), (".*", 2)])
    assert described["encoder/Dense_1/kernel"] == "x0.1" and described["fusion/Dense_0/bias"] == "x2"


@pytest.mark.parametrize("rules, message", [
    ({"head": "fast"}, "'fast' is not a number"),
    ({"head": -1}, "must be finite and >= 0"),
    ({"head": float("inf")}, "must be finite and >= 0"),
    ({"head[": 0.1}, "not a valid regex"),
])
def test_bad_multipliers_give_clear_errors(rules, message):
    with pytest.raises(ValueError, match=message):
        optim.multiplier_rules(rules)


def test_rules_are_dicts_and_sequences():
    assert optim.freeze_patterns(None) == ()
    assert optim.freeze_patterns(["encoder", "fusion"]) == ("encoder", "fusion")
    assert optim.freeze_patterns(("a{1,2}",)) == ("a{1,2}",)
    assert optim.multiplier_rules({"head": 10}) == (("head", 10.0),)
    assert optim.multiplier_rules([("head", "2")]) == (("head", 2.0),)


@pytest.mark.parametrize("kwargs, parser", [
    ({"freeze": "encoder"}, "parse_patterns"),
    ({"lr_multipliers": "head:10"}, "parse_lr_multipliers"),
])
def test_a_string_where_rules_are_expected_is_a_type_error_naming_its_parser(kwargs, parser):
    # The string forms belong to configs and command lines (STYLE #11); `make_optimizer` parses them.
    with pytest.raises(TypeError, match=f"jaxckpt.config_strings.{parser}") as info:
        optim.freeze_and_scale(optax.adam(1e-3), _params(), **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_unknown_names_and_adam_weight_decay_are_rejected():
    params = _params()
    with pytest.raises(ValueError, match="'lamb' is unknown"):
        optim.make_optimizer(_config(name="lamb"), params, num_steps=10)
    with pytest.raises(ValueError, match="'linear' is unknown"):
        optim.make_optimizer(_config(schedule="linear"), params, num_steps=10)
    with pytest.raises(ValueError, match="adamw"):
        optim.make_optimizer(_config(weight_decay=0.1), params, num_steps=10)
    with pytest.raises(ValueError, match="smaller than the decay length 10"):
        optim.make_optimizer(_config(schedule="warmup_cosine", warmup_steps=10), params, num_steps=10)


def test_schedules():
    warm = optim.make_schedule(_config(schedule="warmup_cosine", warmup_steps=10, decay_steps=110),
                               num_steps=1000)
    assert float(warm(0)) == 0.0
    assert float(warm(10)) == pytest.approx(1e-2)
    assert float(warm(60)) == pytest.approx(5e-3, rel=1e-5)
    assert float(warm(110)) == pytest.approx(0.0, abs=1e-9)
    cosine = optim.make_schedule(_config(schedule="cosine"), num_steps=100)
    assert float(cosine(50)) == pytest.approx(5e-3, rel=1e-5)
    constant = optim.make_schedule(_config(warmup_steps=4), num_steps=100)
    assert [float(constant(s)) for s in (2, 4, 99)] == pytest.approx([5e-3, 1e-2, 1e-2])


def test_schedule_position_survives_an_opt_state_round_trip():
    params = {"w": jnp.ones((3,))}
    tx = optim.make_optimizer(_config(name="sgd", schedule="warmup_cosine", warmup_steps=2,
                                      lr_multipliers="w:0.5"), params, num_steps=8)
    grads = {"w": jnp.ones((3,))}
    update = jax.jit(tx.update)
    state = tx.init(params)
    uninterrupted = []
    for step in range(8):
        updates, state = update(grads, state, params)
        uninterrupted.append(float(updates["w"][0]))
        if step == 3:
            # A checkpoint restore hands back plain host arrays of the same structure.
            restored = jax.tree.map(lambda x: jnp.asarray(np.array(x)), state)
    resumed = []
    state = restored
    for _ in range(4):
        updates, state = update(grads, state, params)
        resumed.append(float(updates["w"][0]))
    assert resumed == uninterrupted[4:]
    assert uninterrupted[1] == pytest.approx(-0.5 * 0.5 * 1e-2)  # mid warm-up, halved by the multiplier
    assert len(set(uninterrupted)) > 4


def test_freezing_the_digits_encoder_saves_its_adam_moments():
    params = _params()
    full = optim.make_optimizer(_config(), params, num_steps=10).init(params)
    frozen = optim.make_optimizer(_config(freeze="encoder"), params, num_steps=10).init(params)
    encoder_bytes = sum(x.nbytes for x in jax.tree.leaves(params["encoder"]))
    assert _state_bytes(full) - _state_bytes(frozen) == 2 * encoder_bytes


def test_regex_and_glob_patterns_follow_treepath_rules():
    params = _params()
    described = optim.describe_trainable(params, freeze=["glob:*/Dense_0/bias"],
                                         lr_multipliers={".*/kernel": 0.123456789})
    assert described["encoder/Dense_0/bias"] == "frozen"
    assert described["encoder/Dense_1/bias"] == "train"
    assert described["head/Dense_0/kernel"] == "x0.123456789"
    # A pattern names a whole path or subtree, never a prefix of a name.
    with pytest.raises(ValueError, match="'enc'"):
        optim.describe_trainable(params, freeze=["enc"])
    grads = _grads(params)
    tx = optim.freeze_and_scale(optax.sgd(1.0), params, lr_multipliers={".*/kernel": 0.123456789})
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["head"]["Dense_0"]["kernel"]),
                                  -np.asarray(grads["head"]["Dense_0"]["kernel"]) * np.float32(0.123456789))


def test_frozen_opt_state_round_trips_through_orbax(tmp_path):
    import orbax.checkpoint as ocp
    params = _params()
    tx = optim.make_optimizer(_config(name="adamw", weight_decay=0.1, grad_clip_norm=1.0, freeze="encoder",
                                      lr_multipliers="head:0.5", schedule="cosine"), params, num_steps=10)
    params, opt_state = _run(tx, params, steps=2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", opt_state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt", jax.eval_shape(lambda: opt_state))
    assert jax.tree.structure(restored) == jax.tree.structure(opt_state)  # MaskedNodes survive.
    grads = _grads(params, seed=5)
    expected, _ = tx.update(grads, opt_state, params)
    actual, _ = tx.update(grads, restored, params)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_zero_multiplier_freezes():
    params = _params()
    assert optim.describe_trainable(params, lr_multipliers={"encoder": 0, "head": 2})["encoder/Dense_1/bias"] == "frozen"
    tx = optim.freeze_and_scale(optax.adam(1e-3), params, lr_multipliers={"encoder": 0})
    full = optax.adam(1e-3).init(params)
    encoder_bytes = sum(x.nbytes for x in jax.tree.leaves(params["encoder"]))
    assert _state_bytes(full) - _state_bytes(tx.init(params)) == 2 * encoder_bytes
    # With clipping, the frozen group's gradients must not shrink the others' updates either.
    config = _config(name="sgd", learning_rate=1.0, grad_clip_norm=1e9, lr_multipliers="encoder:0")
    new, _ = _run(optim.make_optimizer(config, params, num_steps=10), params, steps=1)
    for a, b in zip(jax.tree.leaves(new["encoder"]), jax.tree.leaves(params["encoder"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    clipped = _config(name="sgd", learning_rate=1.0, grad_clip_norm=1.0, lr_multipliers="encoder:0")
    new, _ = _run(optim.make_optimizer(clipped, params, num_steps=10), params, steps=1)
    trainable = {k: v for k, v in _grads(params, seed=0).items() if k != "encoder"}
    norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(trainable)))
    moved = params["head"]["Dense_0"]["kernel"] - new["head"]["Dense_0"]["kernel"]
    np.testing.assert_allclose(np.asarray(moved), np.asarray(trainable["head"]["Dense_0"]["kernel"]) / norm,
                               rtol=1e-5, atol=1e-6)
