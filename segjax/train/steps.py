"""Pure train step: `train_step(state, batch, rng, *, loss_fn) -> (state, metrics)`.

`loss_fn(variables, batch, rng, *, train) -> (loss, (metrics, updates))` is bound by the
caller (`functools.partial`), so the step knows nothing about the model or task; `updates`
holds new mutable collections such as `batch_stats`. Jit it once, donating the state.
Under pmap, pass `axis_name`: gradients and metrics are then averaged over devices (batch
statistics already are, by the model's BatchNorm `axis_name`).
"""

from __future__ import annotations

import jax
import optax

from segjax.train.state import TrainState


def train_step(
  state: TrainState, batch: dict, rng: jax.Array, *, loss_fn, axis_name: str | None = None
) -> tuple:
  rng = jax.random.fold_in(rng, state.step)
  if axis_name is not None:  # Independent dropout per device.
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

  def objective(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    return loss_fn(variables, batch, rng, train=True)

  (loss, (metrics, updates)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  metrics = {**metrics, "loss": loss}
  if axis_name is not None:
    grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
  state = state.apply_gradients(
    grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats)
  )
  return state, {**metrics, "grad_norm": optax.tree.norm(grads)}
