"""Saliency (Simonyan et al., "Deep Inside Convolutional Networks", 2014), integrated gradients
(Sundararajan et al., "Axiomatic Attribution for Deep Networks", 2017) and per-example loss
and gradient norm (GraNd, Paul et al., "Deep Learning on a Data Diet", 2021) for semantic
segmentation models, and the command that ranks a split's hardest examples:

  python -m segjax.analysis hardest --workdir DIR [--config FILE] [--split SPLIT] \
      [--top_k 8] [--by loss|grad_norm] [--batch_size 8]

It restores the latest checkpoint of DIR (with DIR/config.json unless `--config`), runs the
model over every example of SPLIT (default the config's `dataset.eval_split`) resized to
`image_size` (as evaluation mode "resize" does, whatever the config's evaluation mode), in
static-shape batches whose padding rows are dropped, and writes
  DIR/analysis/hardest_<split>.json: {"split", "step", "by", "examples": every example, the
    hardest first: {"rank", "index" (its position in the split, in the source's order),
    "loss" (mean cross-entropy over its labelled pixels), "grad_norm" (global L2 norm of
    that loss's gradient with respect to the parameters), "pixel_accuracy"}},
  DIR/analysis/hardest_<split>/NNN_<index>.png: image | label | prediction panels of the top
    K (NNN the rank; the panels of an earlier run are removed first),
and prints the top K (`<split>` as `segjax.train.evaluation.split_filename` spells it).
Examples whose labels are wrong (a flipped or shifted mask) rank high by either signal once
the model has learned the rest, and until it memorizes them: a tiny U-Net trained for 100
epochs on 24 images had learned its 3 corrupted masks, which no longer stood out; after 15
epochs on 64 they ranked first with 10 times the loss of any clean one (tests/
test_analysis.py). Genuinely hard examples rank high too. The loss is computed with
BatchNorm in eval mode (`train=False`), as the model predicts. One process reads the whole
split; the gradients of `--batch_size` examples are held at once.

Instance models (Mask R-CNN) are not covered: their loss depends on sampled proposals.

Shapes: H, W image size, C input channels, K classes, B batch.
"""

from segjax import cli  # noqa: I001  (first: sets TensorFlow's log level before TF loads)

import functools
import heapq
import json
import os
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

BY = ("loss", "grad_norm")


def class_score(
  apply_fn: Callable, image: jax.Array, class_index: int, region: jax.Array | None = None
) -> jax.Array:
  """The mean logit of `class_index` over `region` (bool (H, W), default every pixel) of one
  image (H, W, C); `apply_fn(images (B, H, W, C)) -> logits (B, H, W, K)`."""
  logits = apply_fn(image[None])[0, ..., class_index].astype(jnp.float32)
  if region is None:
    return logits.mean()
  weights = jnp.asarray(region, jnp.float32)
  return (logits * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def saliency(
  apply_fn: Callable, image: jax.Array, class_index: int, region: jax.Array | None = None
) -> jax.Array:
  """(H, W, C): the gradient of `class_score` with respect to the input image (Simonyan et al.
  2014 take its absolute maximum over channels to draw it; this returns it signed)."""
  return jax.grad(class_score, argnums=1)(
    apply_fn, jnp.asarray(image, jnp.float32), class_index, region
  )


def integrated_gradients(
  apply_fn: Callable,
  image: jax.Array,
  class_index: int,
  region: jax.Array | None = None,
  baseline: jax.Array | None = None,
  steps: int = 32,
  batch_size: int | None = None,
) -> jax.Array:
  """(H, W, C): integrated gradients of `class_score` from `baseline` (default zeros, the
  mean colour for normalized images) to `image`:
  `(image - baseline) * mean_k grad f(baseline + a_k (image - baseline))`, the path integral
  approximated by the midpoint Riemann sum, a_k = (k + 1/2) / steps, k < steps (its error falls
  as 1/steps**2 for smooth f; the trapezoid rule needs steps + 1 evaluations for the same
  order). The attributions sum to about f(image) - f(baseline) (completeness). The gradients
  are vmapped over the path, `batch_size` points per model call (default all `steps`)."""
  image = jnp.asarray(image, jnp.float32)
  baseline = jnp.zeros_like(image) if baseline is None else jnp.asarray(baseline, jnp.float32)
  alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
  grad = jax.grad(class_score, argnums=1)

  def grad_at(alpha):
    return grad(apply_fn, baseline + alpha * (image - baseline), class_index, region)

  grads = jax.lax.map(grad_at, alphas, batch_size=batch_size or steps)
  return (image - baseline) * grads.mean(0)


def global_norm(tree) -> jax.Array:
  """The L2 norm of all leaves of `tree` together, in float32."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


@functools.partial(jax.jit, static_argnames=("loss_of_example", "has_aux"))
def per_example_losses_and_grad_norms(
  loss_of_example: Callable, params, batch, *args, has_aux: bool = False
):
  """(losses (B,), grad_norms (B,)[, aux]): `loss_of_example(params, example, *args)` and the
  global L2 norm of its gradient with respect to `params`, for each example of `batch` (a
  pytree whose leaves have the batch axis first; each example without it), by
  `vmap(value_and_grad)`: B gradients are held at once. `args` are shared by every example
  (e.g. BatchNorm statistics). With `has_aux`, the loss returns `(loss, aux)` and aux comes
  back batched. Jitted; `loss_of_example` is static, so bind it once (`functools.partial`)
  to compile once."""
  value_and_grad = jax.value_and_grad(loss_of_example, has_aux=has_aux)

  def one(example):
    value, grads = value_and_grad(params, example, *args)
    return value, global_norm(grads)

  values, norms = jax.vmap(one)(batch)
  if has_aux:
    losses, aux = values
    return losses, norms, aux
  return values, norms


def semantic_example_loss(
  params, example: dict, batch_stats, *, model, ignore_label: int = 255
) -> tuple[jax.Array, dict]:
  """(loss, aux) of one example {"image": (H, W, 3), "mask": (H, W)}: the mean cross-entropy
  over its labelled pixels with BatchNorm in eval mode, and aux {"prediction": int32 (H, W),
  "pixel_accuracy": the fraction of labelled pixels predicted right}. For
  `per_example_losses_and_grad_norms(..., has_aux=True)`, `batch_stats` its shared arg."""
  from segjax import losses
  from segjax.train import semantic

  variables = {"params": params, "batch_stats": batch_stats}
  logits = semantic.logits_fn(model, variables)(example["image"][None])  # An ensemble's mean.
  mask = example["mask"]
  loss = losses.pixel_cross_entropy(logits, mask[None], ignore_label=ignore_label)
  prediction = jnp.argmax(logits[0], -1).astype(jnp.int32)
  labelled = mask != ignore_label
  accuracy = ((prediction == mask) & labelled).sum() / jnp.maximum(labelled.sum(), 1)
  return loss, {"prediction": prediction, "pixel_accuracy": accuracy}


def rank_examples(indices, losses, grad_norms, pixel_accuracies, *, by: str = "loss") -> list[dict]:
  """Every example as {"rank", "index", "loss", "grad_norm", "pixel_accuracy"}, the largest
  `by` ("loss" or "grad_norm") first, ties broken by index."""
  if by not in BY:
    raise ValueError(f"by={by!r}; known: {BY}.")
  rows = [
    {"index": int(i), "loss": float(loss), "grad_norm": float(norm), "pixel_accuracy": float(acc)}
    for i, loss, norm, acc in zip(indices, losses, grad_norms, pixel_accuracies, strict=True)
  ]
  rows.sort(key=lambda r: (-r[by], r["index"]))
  return [{"rank": rank, **row} for rank, row in enumerate(rows)]


def split_examples(config: ml_collections.ConfigDict, split: str, *, batch_size: int):
  """(batches, num_batches): every example of `split` once, in the source's order, resized
  to `config.image_size` and normalized as evaluation mode "resize" does, with "index" (int32,
  its position in the split) and "example_mask"; padded to full batches (index -1, False)."""
  import tensorflow as tf

  from segjax.data import ops, pipeline

  kwargs = config.dataset.get(
    "train_kwargs" if split == config.dataset.train_split else "eval_kwargs", {}
  )
  ds = pipeline.make_source(
    config.dataset,
    split,
    process_index=0,
    process_count=1,
    num_classes=config.model.get("num_classes"),
    **kwargs,
  )
  size = tuple(config.image_size)

  @tf.autograph.experimental.do_not_convert
  def prepare(index, features):
    features = ops.normalize(ops.resize({k: features[k] for k in ("image", "mask")}, size))
    return {**features, "index": tf.cast(index, tf.int32), "example_mask": tf.constant(True)}

  padding = {
    "image": tf.zeros(size + (3,), tf.float32),
    "mask": tf.fill(size, tf.constant(config.dataset.ignore_label, tf.int32)),
    "index": tf.constant(-1, tf.int32),
    "example_mask": tf.constant(False),
  }
  ds = ds.enumerate().map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return pipeline.padded_batches(
    ds,
    padding,
    local_batch_size=batch_size,
    num_batches=None,
    name=f"{config.dataset.name!r} split {split!r}",
  )


def hardest(
  workdir: str,
  config: ml_collections.ConfigDict | None = None,
  *,
  split: str | None = None,
  top_k: int = 8,
  by: str = "loss",
  batch_size: int = 8,
  log: Callable[[str], object] = print,
) -> dict:
  """Ranks every example of `split` and writes the JSON file and the top `top_k` panels (the
  module docstring); returns what the JSON file holds."""
  from segjax import models
  from segjax.errors import ConfigError
  from segjax.predict import for_inference
  from segjax.train import evaluation, parallel, run_config

  if by not in BY:
    raise ValueError(f"by={by!r}; known: {BY}.")
  if top_k < 0 or batch_size < 1:
    raise ValueError(f"top_k={top_k} must be >= 0 and batch_size={batch_size} positive.")
  config = for_inference(run_config.load(workdir) if config is None else config)
  if models.model_class(config.model.name).task != "semantic":
    raise ConfigError(
      f"model {config.model.name!r} is not a semantic model: segjax.analysis "
      "covers semantic segmentation only."
    )
  run_config.check(config)
  split = split or config.dataset.eval_split
  model = models.build_model(config)
  variables, step = evaluation.restore_variables(config, workdir, model, parallel.make_mesh())
  signals, top = score_split(
    config, model, variables, split, by=by, top_k=top_k, batch_size=batch_size
  )
  result = {
    "split": split,
    "step": int(step),
    "by": by,
    "examples": rank_examples(**signals, by=by),
  }
  name = evaluation.split_filename(split)
  os.makedirs(os.path.join(workdir, "analysis"), exist_ok=True)
  with open(os.path.join(workdir, "analysis", f"hardest_{name}.json"), "w") as f:
    json.dump(result, f, indent=2)
  write_panels(os.path.join(workdir, "analysis", f"hardest_{name}"), top, config)
  log(format_ranking(result, top_k))
  return result


def score_split(
  config: ml_collections.ConfigDict,
  model,
  variables: dict,
  split: str,
  *,
  by: str,
  top_k: int,
  batch_size: int,
) -> tuple[dict, list]:
  """(signals, top): {"indices", "losses", "grad_norms", "pixel_accuracies"}, one value per
  example of `split` (`split_examples`), and the `top_k` examples of largest `by` as
  (index, normalized image, mask, prediction), the largest first."""
  from segjax.data.iteration import numpy_batches

  loss_of_example = functools.partial(
    semantic_example_loss, model=model, ignore_label=config.dataset.ignore_label
  )
  batches, _ = split_examples(config, split, batch_size=batch_size)
  signals = {k: [] for k in ("indices", "losses", "grad_norms", "pixel_accuracies")}
  heap = []  # The top_k so far, smallest first: (score, -index, image, mask, prediction).
  for batch in numpy_batches(batches, f"split {split!r}"):
    losses, norms, aux = jax.device_get(
      per_example_losses_and_grad_norms(
        loss_of_example,
        variables["params"],
        {k: batch[k] for k in ("image", "mask")},
        variables.get("batch_stats", {}),
        has_aux=True,
      )
    )
    rows = np.flatnonzero(batch["example_mask"])
    if not np.all(np.isfinite(losses[rows]) & np.isfinite(norms[rows])):
      raise FloatingPointError(
        f"Non-finite loss or gradient norm for the examples "
        f"{batch['index'][rows].tolist()} of split {split!r}."
      )
    for row in rows:
      values = {
        "indices": int(batch["index"][row]),
        "losses": float(losses[row]),
        "grad_norms": float(norms[row]),
        "pixel_accuracies": float(aux["pixel_accuracy"][row]),
      }
      for key, value in values.items():
        signals[key].append(value)
      score = values["losses" if by == "loss" else "grad_norms"]
      item = (
        score,
        -values["indices"],
        batch["image"][row],
        batch["mask"][row],
        aux["prediction"][row],
      )
      if len(heap) < top_k:
        heapq.heappush(heap, item)
      elif top_k and item[:2] > heap[0][:2]:
        heapq.heapreplace(heap, item)
  heap.sort(key=lambda item: item[:2], reverse=True)
  return signals, [(-negative_index, *arrays) for _, negative_index, *arrays in heap]


def write_panels(directory: str, top: list, config: ml_collections.ConfigDict) -> None:
  """`directory/NNN_<index>.png`, image | label | prediction, for each (index, image, mask,
  prediction) of `top` (NNN its rank), after removing an earlier run's panels."""
  from segjax import visualize

  os.makedirs(directory, exist_ok=True)
  for stale in os.listdir(directory):  # They would mix with these.
    if re.fullmatch(r"\d{3,}_\d+\.png", stale):
      os.remove(os.path.join(directory, stale))
  for rank, (index, image, mask, prediction) in enumerate(top):
    panel = visualize.side_by_side(
      image,
      mask,
      prediction,
      config.model.num_classes,
      class_names=config.dataset.get("class_names"),
    )
    visualize.save_png(panel, os.path.join(directory, f"{rank:03d}_{index}.png"))


def format_ranking(result: dict, top_k: int) -> str:
  """The top `top_k` rows of a `hardest` result as a table."""
  lines = [
    f"The {min(top_k, len(result['examples']))} hardest of {len(result['examples'])} "
    f"examples of split {result['split']!r} by {result['by']} (step {result['step']}):",
    f"{'rank':>4} {'index':>7} {'loss':>10} {'grad_norm':>10} {'pixel_acc':>9}",
  ]
  lines += [
    f"{r['rank']:>4} {r['index']:>7} {r['loss']:>10.4f} {r['grad_norm']:>10.4f} "
    f"{r['pixel_accuracy']:>9.4f}"
    for r in result["examples"][:top_k]
  ]
  return "\n".join(lines)


COMMANDS = ("hardest",)


def define_flags() -> None:
  """The command line's flags: defined only when run as a program, so that importing this
  module leaves absl's global flags alone."""
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
    "config",
    None,
    "Config the model was trained with (default: WORKDIR/config.json).",
    lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "Training directory holding checkpoints/.")
  flags.DEFINE_string("split", None, "Split to rank (default the config's dataset.eval_split).")
  flags.DEFINE_integer("top_k", 8, "Examples printed and drawn as panels.")
  flags.DEFINE_enum("by", "loss", BY, "What ranks the examples.")
  flags.DEFINE_integer("batch_size", 8, "Examples per call; their B gradients are held at once.")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(
      f"Give one command of {COMMANDS}, e.g. `python -m segjax.analysis "
      f"hardest --workdir DIR`; got {argv[1:]}."
    )
  cli.hide_gpus_from_tensorflow()
  cli.quiet_logging()
  f = flags.FLAGS
  hardest(f.workdir, f.config, split=f.split, top_k=f.top_k, by=f.by, batch_size=f.batch_size)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
