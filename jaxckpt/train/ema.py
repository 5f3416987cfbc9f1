"""An exponential moving average of the params, kept in the `TrainState` and updated in the step.

`ema = decay * ema + (1 - decay) * params` after every optimizer update, inside the jitted train
step (no extra dispatch, no host round trip). The average starts equal to the initial params and
is a pytree field of the state (`TrainState.ema_params`), so it is saved with every checkpoint and
a resumed run continues it bitwise. With the average off the field is None and the state, its
checkpoints and its tree paths are exactly what they were without it.

Example:
  >>> import jax.numpy as jnp
  >>> update_ema({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, decay=0.9)["w"].tolist()
  [0.09999999403953552, 0.09999999403953552]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxckpt.types import Params

EMA_KEY = "ema_params"
"""Key of the averaged params in a checkpoint's state item (beside `"params"`)."""


def check_decay(decay: float) -> float:
    """Returns `decay` as a float, or says why it is not a usable EMA decay.

    Raises:
      ValueError: unless `0 <= decay < 1` (0 turns the average off; 1 would never move).
    """
    decay = float(decay)
    if not 0.0 <= decay < 1.0:
        raise ValueError(
            f"train.ema_decay={decay} must be in [0, 1): 0 turns the average off, values like 0.999 "
            "average over about 1/(1 - decay) steps.")
    return decay


def init_ema(params: Params) -> Params:
    """The average at step 0: a copy of `params` (its own buffers, so donating one never frees the other)."""
    return jax.tree.map(jnp.copy, params)


def update_ema(ema: Params, params: Params, decay: float) -> Params:
    """One EMA update, in each leaf's own dtype: `decay * ema + (1 - decay) * params`.

    Args:
      ema: the current average.
      params: the params after this step's update.
      decay: in [0, 1); the weight of the past.

    Returns:
      The new average, shaped and typed like `ema`.
    """
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)
