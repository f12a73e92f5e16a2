"""Pure train step: `train_step(state, batch, rng, *, loss_fn) -> (state, metrics)`.

`loss_fn(variables, batch, rng, *, train) -> (loss, (metrics, updates))` is bound by the
caller (`functools.partial`), so the step knows nothing about the model or task; `updates`
holds new mutable collections such as `batch_stats`. Jit it once, donating the state.
"""

from __future__ import annotations

import jax
import optax

from segjax.train.state import TrainState


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, loss_fn) -> tuple:
  rng = jax.random.fold_in(rng, state.step)

  def objective(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    return loss_fn(variables, batch, rng, train=True)

  (loss, (metrics, updates)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads,
                                batch_stats=updates.get("batch_stats", state.batch_stats))
  return state, {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
