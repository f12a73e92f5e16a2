"""PNG panels of the first eval examples, written by `evaluate.py --num_visualizations K`.

Semantic: image | ground-truth classes | predicted classes. Instance: image | ground-truth
instances | detections scoring at least `config.visualization_score_threshold` (default 0.5),
with coloured masks, boxes, class names and scores (`segjax.visualize`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax import visualize
from segjax.data.iteration import numpy_batches
from segjax.models import mask_rcnn
from segjax.train import parallel, semantic


def _examples(dataset, predict, count: int) -> Iterator[tuple[dict, dict]]:
  """(example, prediction) pairs of the first `count` real examples, as numpy dicts."""
  seen = 0
  for batch in numpy_batches(dataset, "evaluation data"):
    predictions = jax.tree.map(np.asarray, predict(batch))
    for i in np.flatnonzero(batch["example_mask"]):
      if seen == count:
        return
      seen += 1
      yield ({k: v[i] for k, v in batch.items()}, {k: v[i] for k, v in predictions.items()})


def _save(panels: Iterator[np.ndarray], directory: str) -> list[str]:
  os.makedirs(directory, exist_ok=True)
  paths = []
  for panel in panels:
    paths.append(os.path.join(directory, f"{len(paths):04d}.png"))
    visualize.save_png(panel, paths[-1])
  return paths


def write_semantic(
  config: ml_collections.ConfigDict, evaluator, model, variables, directory: str, count: int
) -> list[str]:
  """Panels image | ground truth | prediction of the first `count` eval examples."""
  variables = parallel.fetch(variables)  # This process's copy: no collective, any process.
  if getattr(evaluator, "canvas", None) is None:  # "resize": images and masks of one size.
    labels = jax.jit(lambda v, x: jnp.argmax(semantic.logits_fn(model, v)(x), -1))
    predict = lambda batch: {"mask": labels(variables, batch["image"])}
  else:  # "whole"/"slide": the evaluator's scores, at each mask's original size.
    infer = semantic.bind_inference(config)
    labels = jax.jit(
      lambda v, b: jnp.argmax(
        infer(
          semantic.logits_fn(model, v),
          b["image"],
          b["image_size"],
          b["mask_size"],
          b["mask"].shape[1:3],
        ),
        -1,
      )
    )
    predict = lambda batch: {"mask": labels(variables, batch)}

  def panel(example, pred):
    image, mask, prediction = example["image"], example["mask"], pred["mask"]
    if "mask_size" in example:  # Cropped to the content; the image shown at the mask's size.
      (h, w), (mh, mw) = example["image_size"], example["mask_size"]
      image = np.asarray(jax.image.resize(image[:h, :w], (mh, mw, 3), "bilinear"))
      mask, prediction = mask[:mh, :mw], prediction[:mh, :mw]
    return visualize.side_by_side(
      image,
      mask,
      prediction,
      config.model.num_classes,
      class_names=config.dataset.get("class_names"),
    )

  return _save((panel(e, p) for e, p in _examples(evaluator.dataset, predict, count)), directory)


def _class_names(config: ml_collections.ConfigDict, evaluator) -> tuple[str, ...] | None:
  """Names by label: `config.dataset.class_names`, else the ground truth's COCO categories."""
  if config.dataset.get("class_names"):
    return tuple(config.dataset.class_names)
  gt, category_ids = getattr(evaluator, "gt", None), getattr(evaluator, "category_ids", None)
  if gt is None or category_ids is None:
    return None
  # dataset.category_ids may list ids the file lacks (torchvision's "N/A" labels).
  return ("background",) + tuple(
    gt.cats[c]["name"] if c in gt.cats else "N/A" for c in category_ids
  )


def write_instance(
  config: ml_collections.ConfigDict, evaluator, model, variables, directory: str, count: int
) -> list[str]:
  """Panels image | ground truth | detections of the first `count` eval examples, each
  cropped to the example's true (unpadded) size."""
  variables = parallel.fetch(variables)
  detect = jax.jit(functools.partial(mask_rcnn.predict, model=model))
  predict = lambda batch: detect(
    variables, {"image": batch["image"], "image_size": batch["image_size"]}
  )
  class_names = _class_names(config, evaluator)
  threshold = config.get("visualization_score_threshold", 0.5)

  def panel(example, pred):
    h, w = (int(v) for v in example["image_size"])
    crop = lambda d: {**d, "instance_masks": d["instance_masks"][:, :h, :w]}
    return visualize.instance_panel(
      example["image"][:h, :w],
      crop(example),
      crop(pred),
      num_classes=config.model.roi_heads.num_classes + 1,
      class_names=class_names,
      score_threshold=threshold,
    )

  return _save((panel(e, p) for e, p in _examples(evaluator.dataset, predict, count)), directory)
