import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxckpt.train.state import TrainState


def _state(tx=None):
    params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
    return TrainState.create(apply_fn=None, params=params, tx=tx or optax.adam(1e-2), rng=jax.random.PRNGKey(0))


def test_create_starts_at_step_zero_with_optimizer_state():
    state = _state()
    assert int(state.step) == 0
    assert state.step.dtype == jnp.int32
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(optax.adam(1e-2).init(state.params))


def test_apply_gradients_returns_new_state_and_leaves_old_untouched():
    state = _state(optax.sgd(0.5))
    grads = jax.tree.map(jnp.ones_like, state.params)
    new = state.apply_gradients(grads=grads)
    assert int(new.step) == 1
    np.testing.assert_allclose(new.params["dense"]["kernel"], 0.5)
    np.testing.assert_allclose(state.params["dense"]["kernel"], 1.0)


def test_state_is_frozen():
    state = _state()
    with pytest.raises(Exception):
        state.step = 3  # type: ignore[misc]


def test_static_fields_are_not_leaves():
    state = _state()
    leaves = jax.tree.leaves(state)
    # step, rng, kernel, bias, and adam's count/mu/nu leaves; tx and apply_fn are not leaves.
    assert all(isinstance(x, jax.Array) for x in leaves)


def test_typed_key_is_stored_raw():
    state = TrainState.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=optax.sgd(1.0), rng=jax.random.key(3))
    assert state.rng.dtype == jnp.uint32
    np.testing.assert_array_equal(state.rng, jax.random.key_data(jax.random.key(3)))


def test_step_rng_depends_only_on_step():
    a = _state().replace(step=jnp.asarray(7, jnp.int32))
    b = _state(optax.sgd(1.0)).replace(step=jnp.asarray(7, jnp.int32))
    np.testing.assert_array_equal(a.step_rng(), b.step_rng())
    assert not np.array_equal(a.step_rng(), a.replace(step=jnp.asarray(8, jnp.int32)).step_rng())


def test_apply_gradients_without_tx_is_a_clear_error():
    state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones(1)}, opt_state=(), rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="no optimizer"):
        state.apply_gradients(grads={"w": jnp.ones(1)})


def _documented_constants():
    """Module-level names in jaxckpt followed by a string literal (an attribute docstring)."""
    import ast
    import pathlib

    import jaxckpt

    names = set()
    for path in pathlib.Path(jaxckpt.__file__).parent.glob("*.py"):
        body = ast.parse(path.read_text()).body
        for node, after in zip(body, body[1:]):
            documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                and isinstance(after.value.value, str) and after.value.value.strip()
            if isinstance(node, ast.Assign) and documented:
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_public_api_names_exist_sorted_and_documented():
    # The package face (jaxckpt/__init__.py) has no test module of its own; it is checked here.
    import inspect

    import jaxckpt

    assert list(jaxckpt.__all__) == sorted(jaxckpt.__all__)
    assert len(set(jaxckpt.__all__)) == len(jaxckpt.__all__)
    constants = _documented_constants()
    undocumented = []
    for name in jaxckpt.__all__:
        obj = getattr(jaxckpt, name)  # AttributeError names a listed but missing export
        if inspect.isclass(obj):
            doc = vars(obj).get("__doc__")  # its own, not one inherited from a base class
        elif inspect.isfunction(obj) or inspect.ismodule(obj):
            doc = obj.__doc__
        else:
            doc = name if name in constants else None
        if not (doc and doc.strip()):
            undocumented.append(name)
    assert not undocumented, f"public names without a docstring: {undocumented}"
    for name in ("CheckpointCorruptError", "CheckpointNotFoundError", "CheckpointSaveError", "RetentionPolicy",
                 "UserError", "WorkdirError", "write_safetensors"):
        assert name in jaxckpt.__all__, name


def test_public_functions_document_args_and_returns():
    import inspect

    import jaxckpt

    missing = []
    for name in jaxckpt.__all__:
        fn = getattr(jaxckpt, name)
        if not inspect.isfunction(fn):
            continue
        signature = inspect.signature(fn)
        sections = ["Args:"] if signature.parameters else []
        sections += [] if signature.return_annotation in (None, "None") else ["Returns:"]
        missing += [f"{name} ({s})" for s in sections if s not in (fn.__doc__ or "")]
    assert not missing, f"public functions whose docstring lacks a section: {missing}"
