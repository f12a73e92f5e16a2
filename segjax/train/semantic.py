"""Semantic segmentation task: the loss and the evaluation step for pixel-wise classifiers,
and prediction on new images (`segjax.predict`).

Any model whose `apply(variables, image, train=...)` returns `(logits (B, H, W, K), aux)`
fits: these functions are bound to it with `functools.partial`. So does an ensemble
(`segjax.models.ensemble`), whose logits stack its members' (E, B, H, W, K): its loss is the
sum of the members' losses, its prediction the mean of the members' softmax outputs, and
evaluation reports the ensemble's metrics and each member's (`member_{i}/mean_iou`, ...).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from segjax import losses, metrics, models, visualize
from segjax.data import pipeline
from segjax.errors import ConfigError
from segjax.ops import sliding
from segjax.train import parallel


def apply_model(
  model, variables: dict, image: jax.Array, rng: jax.Array | None, *, train: bool
) -> tuple[jax.Array, dict]:
  """(logits, updates): runs the model, collecting new batch statistics when training."""
  has_batch_stats = bool(jax.tree.leaves(variables.get("batch_stats", {})))
  mutable = ["batch_stats"] if train and has_batch_stats else False
  rngs = {"dropout": rng} if rng is not None else {}
  out = model.apply(variables, image, train=train, mutable=mutable, rngs=rngs)
  (logits, _), updates = out if mutable else (out, {})
  return logits, updates


def combine_members(logits: jax.Array) -> jax.Array:
  """An ensemble's member logits (E, B, H, W, K) -> (B, H, W, K) the log of the members' mean
  softmax: its softmax is that mean, its argmax the ensemble's prediction. Logits without a
  member axis are returned as they are."""
  if logits.ndim != 5:
    return logits
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(logits.shape[0])


def logits_fn(model, variables: dict):
  """`images -> logits` of the model in inference mode (what `sliding` and analysis call);
  an ensemble's combined by `combine_members`."""
  return lambda image: combine_members(apply_model(model, variables, image, None, train=False)[0])


def dense_probabilities(infer, model, variables: dict, images: jax.Array, *args, **kwargs):
  """(probs, member_probs): `infer(apply_fn, images, *args, **kwargs)` (`bind_inference`'s
  probabilities) of the model; for an ensemble the mean over its members of each member's,
  and those (E, ...) (else None). The members run together: vmapping over the member index
  leaves the model's forward pass unbatched, so it runs once per window."""

  def apply_fn(image):
    return apply_model(model, variables, image, None, train=False)[0]

  shape = jax.eval_shape(apply_fn, images).shape
  if len(shape) != 5:
    return infer(apply_fn, images, *args, **kwargs), None
  members = jax.vmap(lambda i: infer(lambda image: apply_fn(image)[i], images, *args, **kwargs))(
    jnp.arange(shape[0])
  )
  return members.mean(0), members


def loss_fn(
  variables: dict,
  batch: dict,
  rng: jax.Array,
  *,
  model,
  train: bool,
  ignore_label: int = 255,
  class_weights=None,
) -> tuple:
  """(loss, (metrics, updates)): cross-entropy averaged over the labelled pixels of the batch;
  for an ensemble, the sum of its members' (so that each member's gradient is its own
  loss's), each logged as `member_{i}/loss`, and the accuracy of the members' mean softmax;
  for an ensemble whose members train on their own slices of the batch (`split_batch`), each
  member's loss and predictions on its slice.

  In a pmapped step, the per-device means are rescaled by this device's share of the
  labelled pixels (`parallel.as_global_mean`), so that averaging over devices gives the mean
  over the global batch, as one device would compute it, however unevenly the ignored pixels
  fall.
  """
  logits, updates = apply_model(model, variables, batch["image"], rng, train=train)

  def cross_entropy(logits, masks):
    return losses.pixel_cross_entropy(
      logits, masks, ignore_label=ignore_label, class_weights=class_weights
    )

  split = isinstance(model, models.Ensemble) and model.splits(train)
  masks = model.member_slices(batch["mask"]) if split else batch["mask"]  # (E, B / E, H, W)
  labelled = masks != ignore_label
  if logits.ndim == 5:
    members = jax.vmap(cross_entropy, in_axes=(0, 0 if split else None))(logits, masks)
    predicted = jnp.argmax(logits if split else combine_members(logits), -1)
    # Each member's mean is over the labelled pixels it saw: its own, when split.
    members = parallel.as_global_mean(
      members, labelled.sum(tuple(range(1, labelled.ndim))) if split else labelled.sum()
    )
    loss = members.sum()
  else:
    members, predicted = None, jnp.argmax(logits, -1)
    loss = parallel.as_global_mean(cross_entropy(logits, masks), labelled.sum())
  accuracy = ((predicted == masks) & labelled).sum() / jnp.maximum(labelled.sum(), 1)
  accuracy = parallel.as_global_mean(accuracy, labelled.sum())
  metrics = {"pixel_accuracy": accuracy}
  if members is not None:
    metrics.update({f"member_{i}/loss": members[i] for i in range(members.shape[0])})
  return loss, (metrics, updates)


def bind_loss(config, model):
  """`loss_fn` bound to `model` and the config's ignored label, for the train step."""
  return functools.partial(loss_fn, model=model, ignore_label=config.dataset.ignore_label)


def eval_step(
  variables: dict, batch: dict, *, model, num_classes: int, ignore_label: int = 255
) -> dict:
  """Sums for one batch, to be added over batches: confusion matrix and top-k counts.

  Padding rows (`example_mask == False`) contribute nothing. An ensemble is scored by the
  mean of its members' softmax, and each member's counts are stacked under "members".
  """
  logits, _ = apply_model(model, variables, batch["image"], None, train=False)
  count = functools.partial(
    eval_counts, batch=batch, num_classes=num_classes, ignore_label=ignore_label
  )
  if logits.ndim != 5:
    return count(logits)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return _with_members(count, probs.mean(0), probs)


def native_eval_step(
  variables: dict, batch: dict, *, model, num_classes: int, ignore_label: int = 255, infer
) -> dict:
  """`eval_step` for whole/slide batches (`segjax.data.pipeline.eval_dataset`): scores from
  `infer(apply_fn, image, image_size, mask_size, mask_shape)` (`segjax.ops.sliding.
  dense_probabilities` bound to the evaluation settings) at the masks' original size; for
  an ensemble, the mean of its members' (`dense_probabilities`), each member's counts
  stacked under "members"."""
  count = functools.partial(
    eval_counts, batch=batch, num_classes=num_classes, ignore_label=ignore_label
  )
  scores, members = dense_probabilities(
    infer,
    model,
    variables,
    batch["image"],
    batch["image_size"],
    batch["mask_size"],
    batch["mask"].shape[1:3],
  )
  return _with_members(count, scores, members)


def _with_members(count, scores, members) -> dict:
  """`count(scores)`, and each member's counts stacked under "members" for an ensemble."""
  if members is None:
    return count(scores)
  return {**count(scores), "members": jax.vmap(count)(members)}


def eval_counts(
  scores: jax.Array, batch: dict, *, num_classes: int, ignore_label: int = 255
) -> dict:
  """Confusion matrix and top-k counts of `scores` (B, H, W, K) (logits or probabilities)
  against `batch["mask"]` (B, H, W): only rows with `example_mask`, pixels not
  `ignore_label` and, when the batch has `mask_size`, inside each mask's original extent."""
  weights = jnp.broadcast_to(batch["example_mask"][:, None, None], batch["mask"].shape)
  if "mask_size" in batch:  # Padding is labelled ignore already; this keeps it out regardless.
    weights &= sliding.content_mask(batch["mask_size"], batch["mask"].shape[1:3])
  labelled = weights & (batch["mask"] != ignore_label)
  labels = jnp.where(labelled, batch["mask"], 0)
  in_top5 = in_top_k(scores, labels, 5) & labelled
  return {
    "confusion_matrix": metrics.confusion_matrix(
      batch["mask"], jnp.argmax(scores, -1), num_classes, ignore_label, weights=weights
    ),
    "top5_correct": in_top5.sum(),
    "num_pixels": labelled.sum(),
  }


def in_top_k(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Whether each label (...) is among the indices `jax.lax.top_k(scores (..., K), k)` returns:
  fewer than k classes rank before it, in top_k's order (IEEE total order, so -0 < +0 and NaN
  is largest; ties to the lower class index). Counting instead of sorting: `top_k` sorts every
  pixel's scores, 23 % of the U-Net's evaluation step on CPU (batch 8, 128x128)."""
  num_classes = scores.shape[-1]
  if k >= num_classes:
    return jnp.ones(labels.shape, bool)
  bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.int32)
  scores = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)  # Ordered as top_k orders.
  own = jnp.take_along_axis(scores, labels[..., None], axis=-1)
  before = (scores > own) | ((scores == own) & (jnp.arange(num_classes) < labels[..., None]))
  return before.sum(-1) < k


def summarize(sums: dict, class_names=None) -> dict:
  """Final metrics from the summed eval-step outputs; with an ensemble's "members" counts,
  also each member's `member_{i}/mean_iou`, `member_{i}/pixel_accuracy` and
  `member_{i}/top5_accuracy`."""
  result = metrics.segmentation_metrics(sums["confusion_matrix"], class_names=class_names)
  result["top1_accuracy"] = result["pixel_accuracy"]
  result["top5_accuracy"] = float(sums["top5_correct"]) / max(float(sums["num_pixels"]), 1.0)
  members = sums.get("members")
  for i in range(0 if members is None else len(members["confusion_matrix"])):
    member = summarize(jax.tree.map(lambda x, i=i: x[i], members))
    for key in ("mean_iou", "pixel_accuracy", "top5_accuracy"):
      result[f"member_{i}/{key}"] = member[key]
  return result


# Prediction on new images: the semantic half of `segjax.train.tasks.Task`'s prediction seam.


def stride(config: ml_collections.ConfigDict) -> int:
  """What padded sizes must be multiples of: the model's `stride` (U-Net: 2**depth)."""
  return models.create_model(config.model).stride


def bind_inference(config: ml_collections.ConfigDict):
  """`segjax.ops.sliding.dense_probabilities` bound to `config.evaluation` (whole/slide) and
  the model's stride."""
  settings = pipeline.evaluation_settings(config)
  slide = settings.mode == "slide"
  multiple = stride(config)
  if slide and any(c % multiple for c in settings.crop_size):
    raise ConfigError(
      f"evaluation.crop_size={tuple(settings.crop_size)} must be divisible by "
      f"the model's stride {multiple}."
    )
  return functools.partial(
    sliding.dense_probabilities,
    multiple=multiple,
    scales=tuple(float(s) for s in settings.scales),
    flip=bool(settings.flip),
    crop=tuple(settings.crop_size) if slide else None,
    stride=tuple(settings.stride) if slide else None,
    same_size=not settings.shorter_side,
  )


def preprocess(config: ml_collections.ConfigDict, image: np.ndarray) -> tuple[np.ndarray, dict]:
  """(image, meta): the image at its size (padded, never resized, so that the prediction has
  the image's pixels), or, with `evaluation.shorter_side` (whole/slide), resized as the eval
  pipeline resizes it (float32, bilinear); meta `original_size`, `image_size`, `scale`."""
  original = tuple(int(s) for s in image.shape[:2])
  settings = pipeline.evaluation_settings(config)
  if settings.mode == "resize" or not settings.shorter_side:
    return image, {"original_size": original, "image_size": original, "scale": 1.0}
  import tensorflow as tf

  size = pipeline.eval_image_size(tf.constant(original, tf.int32), settings.shorter_side)
  resized = tf.image.resize(tf.constant(image, tf.float32), size, method="bilinear").numpy()
  return resized, {
    "original_size": original,
    "image_size": tuple(int(s) for s in size),
    "scale": float(size[0]) / original[0],
  }


def bind_predict(config: ml_collections.ConfigDict, model):
  """`predict(variables, batch)` -> {"probs": (B, H, W, K) float32, "labels": (B, H, W)
  int32} of the normalized images `batch["image"]` (B, H, W, 3), H and W multiples of
  `stride`, padding 0 (as the eval pipelines pad), content sizes `batch["image_size"]`.

  Evaluation mode "resize": the softmax of the model's logits. "whole"/"slide": what the
  evaluator scores, `bind_inference`'s probabilities (windows, flip and scale passes) at the
  input's size. An ensemble's are the mean of its members'. `labels` is their argmax, as
  the evaluator takes it.
  """
  resize_mode = pipeline.evaluation_settings(config).mode == "resize"
  infer = None if resize_mode else bind_inference(config)

  def predict(variables: dict, batch: dict) -> dict:
    image, size = batch["image"], batch["image_size"]
    if infer is None:  # An ensemble's logits_fn gives the log of its members' mean softmax.
      scores = logits_fn(model, variables)(image).astype(jnp.float32)
      probs = jax.nn.softmax(scores, axis=-1)
    else:
      scores = probs = dense_probabilities(
        infer, model, variables, image, size, size, image.shape[1:3], same_size=True
      )[0]
    return {"probs": probs, "labels": jnp.argmax(scores, -1).astype(jnp.int32)}

  return predict


def bind_postprocess(config: ml_collections.ConfigDict):
  """`postprocess(prediction, meta, *, score_threshold)`: one image's `predict` output (no
  batch axis, numpy) at its original size: {"labels": int32 (h, w), "probs": float32
  (h, w, K)}: cropped, or, for images that `preprocess` resized, the probabilities resized
  bilinearly back (`sliding.resize_content`; the evaluator resizes each pass's logits before
  the softmax instead, so labels may differ on a few boundary pixels) and their argmax.
  `score_threshold` is accepted for the instance task's sake and ignored."""
  del config

  def postprocess(prediction: dict, meta: dict, *, score_threshold: float = 0.5) -> dict:
    del score_threshold
    h, w = meta["original_size"]
    if tuple(meta["image_size"]) == (h, w):
      return {
        "labels": np.asarray(prediction["labels"][:h, :w], np.int32),
        "probs": np.asarray(prediction["probs"][:h, :w], np.float32),
      }
    probs = np.asarray(
      sliding.resize_content(
        jnp.asarray(prediction["probs"]),
        jnp.asarray(meta["image_size"], jnp.int32),
        jnp.asarray((h, w), jnp.int32),
        (h, w),
      ),
      np.float32,
    )
    return {"labels": probs.argmax(-1).astype(np.int32), "probs": probs}

  return postprocess


def write_predictions(
  config: ml_collections.ConfigDict,
  directory: str,
  predictions: Iterable[tuple[str, np.ndarray, dict]],
  *,
  overlay: bool = False,
) -> list[str]:
  """Writes `NAME.png` for each (NAME, uint8 image, postprocessed prediction): the class ids
  as a single-channel palette PNG (`segjax.visualize.palette` colours) of the image's size;
  with `overlay`, also `NAME_overlay.png`, the classes blended on the image with a legend.
  Returns the paths written."""
  num_classes = config.model.num_classes
  if num_classes > 256:
    raise ValueError(f"{num_classes} classes do not fit an 8-bit palette PNG.")
  colours = visualize.palette(num_classes)[:num_classes]
  names = config.dataset.get("class_names")
  paths = []
  for name, image, prediction in predictions:
    png = Image.fromarray(prediction["labels"].astype(np.uint8))
    png.putpalette(colours.ravel().tolist())  # "L" becomes "P", keeping the values.
    paths.append(os.path.join(directory, f"{name}.png"))
    png.save(paths[-1])
    if overlay:
      paths.append(os.path.join(directory, f"{name}_overlay.png"))
      visualize.save_png(
        visualize.semantic_overlay(
          image, prediction["labels"], num_classes=num_classes, class_names=names
        ),
        paths[-1],
      )
  return paths
