"""`TrainState`: everything that decides the future of a run, as one immutable pytree."""

from __future__ import annotations

from typing import Any, Callable

import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxckpt.train.ema import EMA_KEY, init_ema
from jaxckpt.types import Params, PyTree


@flax.struct.dataclass
class TrainState:
    """Immutable training state: a pytree of arrays plus static callables.

    Array fields are saved in checkpoints; `apply_fn` and `tx` are static (not saved, rebuilt from
    code and config). Change a state only through `.replace(...)` or `apply_gradients`.

    Attributes:
      step: int32 scalar, the number of optimizer updates applied so far.
      params: the model parameters.
      opt_state: the optimizer state of `tx` for `params` (holds the schedule position too).
      rng: the base PRNG key (a raw `uint32[2]` key, so plain Orbax can save and read it); the key
        for step `s` is `jax.random.fold_in(rng, s)`, a function of the step, never of history.
      model_state: extra non-trained model state (e.g. batch statistics), or None.
      ema_params: an exponential moving average of `params` (see `jaxckpt.train.ema`), or None when
        the average is off; a None average is left out of the state dict, so checkpoints without
        one are exactly what they were before the field existed.
      apply_fn: the model's apply function (static).
      tx: the optax optimizer (static).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxckpt import TrainState
      >>> state = TrainState.create(apply_fn=None, params={"w": jnp.ones(3)},
      ...                           tx=optax.sgd(0.1), rng=jax.random.PRNGKey(0))
      >>> state = state.apply_gradients(grads={"w": jnp.ones(3)})
      >>> int(state.step), state.params["w"].tolist()
      (1, [0.8999999761581421, 0.8999999761581421, 0.8999999761581421])
    """

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    rng: jax.Array
    model_state: PyTree = None
    ema_params: Params | None = None
    apply_fn: Callable[..., Any] | None = flax.struct.field(pytree_node=False, default=None)
    tx: optax.GradientTransformation | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable[..., Any] | None,
        params: Params,
        tx: optax.GradientTransformation,
        rng: jax.Array,
        model_state: PyTree = None,
        ema: bool = False,
    ) -> "TrainState":
        """A fresh state at step 0 with `tx.init(params)` as the optimizer state.

        Args:
          apply_fn: the model's apply function (kept static; may be None).
          params: initial parameters.
          tx: the optax optimizer.
          rng: a PRNG key (`jax.random.PRNGKey(seed)`); typed keys are converted to raw keys.
          model_state: optional non-trained model state.
          ema: keep an exponential moving average of the params (`ema_params`), starting as a copy
            of `params`; `make_train_step(ema_decay=...)` updates it.

        Returns:
          The new `TrainState`.
        """
        if jnp.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key):
            rng = jax.random.key_data(rng)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=rng,
            model_state=model_state,
            ema_params=init_ema(params) if ema else None,
            apply_fn=apply_fn,
            tx=tx,
        )

    def apply_gradients(self, *, grads: Params, **changes: Any) -> "TrainState":
        """One optimizer update: returns a new state with `step + 1`.

        Args:
          grads: gradients shaped like `params`.
          **changes: other fields to replace at the same time (e.g. `model_state=`).

        Returns:
          The updated state; `self` is unchanged.

        Raises:
          ValueError: if the state was built without an optimizer.
        """
        if self.tx is None:
            raise ValueError("TrainState has no optimizer (tx=None); build it with TrainState.create(tx=...).")
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)

    def step_rng(self) -> jax.Array:
        """The PRNG key of the current step: `fold_in(rng, step)`."""
        return jax.random.fold_in(self.rng, self.step)


# flax's state dict, with the average left out when it is off: a state without one saves and restores
# exactly as before the field existed, and old checkpoints restore into it.
_DATA_FIELDS = ("step", "params", "opt_state", "rng", "model_state", EMA_KEY)


def _to_state_dict(state: TrainState) -> dict[str, Any]:
    return {name: flax.serialization.to_state_dict(getattr(state, name)) for name in _DATA_FIELDS
            if not (name == EMA_KEY and state.ema_params is None)}


def _from_state_dict(state: TrainState, tree: dict[str, Any]) -> TrainState:
    tree = dict(tree)
    if state.ema_params is None and tree.get(EMA_KEY) is None:
        tree.pop(EMA_KEY, None)
        fields = _DATA_FIELDS[:-1]
    else:
        fields = _DATA_FIELDS
    unknown = set(tree) - set(fields)
    missing = [name for name in fields if name not in tree]
    if unknown or missing:
        raise ValueError(
            f"TrainState state dict has fields {sorted(tree)}; expected {list(fields)} (missing {missing}, "
            f"unknown {sorted(unknown)}). A checkpoint saved with train.ema_decay > 0 carries {EMA_KEY!r}: "
            "restore it into a state created with ema=True, or one without into ema=False.")
    return state.replace(**{name: flax.serialization.from_state_dict(getattr(state, name), tree[name], name=name)
                            for name in fields})


flax.serialization.register_serialization_state(TrainState, _to_state_dict, _from_state_dict, override=True)
