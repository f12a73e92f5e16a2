"""Semantic segmentation task: the loss and the evaluation step for pixel-wise classifiers.

Any model whose `apply(variables, image, train=...)` returns `(logits (B, H, W, K), aux)`
fits: these functions are bound to it with `functools.partial`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from segjax import losses, metrics


def apply_model(model, variables: dict, image: jax.Array, rng: jax.Array | None, *,
                train: bool) -> tuple[jax.Array, dict]:
  """(logits, updates): runs the model, collecting new batch statistics when training."""
  has_batch_stats = bool(jax.tree.leaves(variables.get("batch_stats", {})))
  mutable = ["batch_stats"] if train and has_batch_stats else False
  rngs = {"dropout": rng} if rng is not None else {}
  out = model.apply(variables, image, train=train, mutable=mutable, rngs=rngs)
  (logits, _), updates = out if mutable else (out, {})
  return logits, updates


def loss_fn(variables: dict, batch: dict, rng: jax.Array, *, model, train: bool,
            ignore_label: int = 255, class_weights=None, axis_name: str | None = None) -> tuple:
  """(loss, (metrics, updates)): cross-entropy averaged over the labelled pixels of the batch.

  Under pmap (`axis_name`), the per-device mean is rescaled by this device's share of the
  labelled pixels, so that averaging over devices gives the mean over the global batch, as
  one device would compute it, however unevenly the ignored pixels fall.
  """
  logits, updates = apply_model(model, variables, batch["image"], rng, train=train)
  loss = losses.pixel_cross_entropy(logits, batch["mask"], ignore_label=ignore_label,
                                    class_weights=class_weights)
  labelled = batch["mask"] != ignore_label
  correct = (jnp.argmax(logits, -1) == batch["mask"]) & labelled
  accuracy = correct.sum() / jnp.maximum(labelled.sum(), 1)
  if axis_name is not None:
    count = labelled.sum()
    share = count * jax.lax.psum(1, axis_name) / jnp.maximum(jax.lax.psum(count, axis_name), 1)
    loss, accuracy = loss * share, accuracy * share
  return loss, ({"pixel_accuracy": accuracy}, updates)


def bind_loss(config, model):
  """`loss_fn` bound to `model` and the config's ignored label, for the train step."""
  return functools.partial(loss_fn, model=model, ignore_label=config.dataset.ignore_label)


def eval_step(variables: dict, batch: dict, *, model, num_classes: int,
              ignore_label: int = 255) -> dict:
  """Sums for one batch, to be added over batches: confusion matrix and top-k counts.

  Padding rows (`example_mask == False`) contribute nothing.
  """
  logits, _ = apply_model(model, variables, batch["image"], None, train=False)
  weights = jnp.broadcast_to(batch["example_mask"][:, None, None], batch["mask"].shape)
  labelled = weights & (batch["mask"] != ignore_label)
  labels = jnp.where(labelled, batch["mask"], 0)
  k5 = min(5, num_classes)
  top5 = jax.lax.top_k(logits, k5)[1]
  in_top5 = (top5 == labels[..., None]).any(-1) & labelled
  return {
    "confusion_matrix": metrics.confusion_matrix(
      batch["mask"], jnp.argmax(logits, -1), num_classes, ignore_label, weights=weights),
    "top5_correct": in_top5.sum(),
    "num_pixels": labelled.sum(),
  }


def summarize(sums: dict, class_names=None) -> dict:
  """Final metrics from the summed eval-step outputs."""
  result = metrics.segmentation_metrics(sums["confusion_matrix"], class_names=class_names)
  result["top1_accuracy"] = result["pixel_accuracy"]
  result["top5_accuracy"] = float(sums["top5_correct"]) / max(float(sums["num_pixels"]), 1.0)
  return result
