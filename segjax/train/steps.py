"""Pure train step: `train_step(state, batch, rng, *, loss_fn) -> (state, metrics)`.

`loss_fn(variables, batch, rng, *, train) -> (loss, (metrics, updates))` is bound by the
caller (`functools.partial`), so the step knows nothing about the model or task; `updates`
holds new mutable collections such as `batch_stats`. Compile it once with
`segjax.train.parallel.runner(...).train_step`, which donates the state; when that pmaps it,
each device's key differs and gradients and metrics are averaged over the devices (batch
statistics already are, by the models' BatchNorm), and under jit those helpers do nothing.
"""

from __future__ import annotations

import jax
import optax

from segjax.train import parallel
from segjax.train.state import TrainState


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, loss_fn) -> tuple:
  rng = parallel.fold_in_device(jax.random.fold_in(rng, state.step))

  def objective(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    return loss_fn(variables, batch, rng, train=True)

  (loss, (metrics, updates)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  metrics = {**metrics, "loss": loss}
  grads, metrics = parallel.mean_over_devices((grads, metrics))
  state = state.apply_gradients(
    grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats)
  )
  return state, {**metrics, "grad_norm": optax.tree.norm(grads)}
