"""Instance segmentation task (Mask R-CNN): the loss for the train step, and COCO evaluation.

The evaluator runs the jitted `segjax.models.mask_rcnn.predict` over the instance eval split
(`segjax.data.instance_pipeline.instance_eval_dataset`), writes the detections in the COCO
results format in original image coordinates (`segjax.coco_eval.detections_to_coco_json`)
and scores them with pycocotools' COCOeval against the split's ground truth, which the data
set's source gives (`segjax.data.instance_sources`: the COCO JSON for "coco" and
"instance_folder", `segjax.coco_eval.shapes_to_coco` for "shapes"). With several processes,
each converts the detections of its share and all gather the results before scoring.

The prediction functions at the end serve `segjax.predict` on new images with the same
resizing, padding and conversion back to original pixels; models of
`conventions="torchvision"` resize as torchvision does and get their masks pasted in the
original image, so that an imported torchvision model predicts what torchvision predicts.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from segjax import coco_eval, models, ops, visualize
from segjax.data import instance_ops, instance_pipeline, instance_sources
from segjax.data.iteration import numpy_batches
from segjax.models import mask_rcnn
from segjax.train import parallel


def bind_loss(config: ml_collections.ConfigDict, model):
  """`mask_rcnn.loss_fn` bound to `model`; in a pmapped step the mean over devices of each
  device's losses is the step's, as detectron2 averages its per-GPU losses."""
  del config
  return functools.partial(mask_rcnn.loss_fn, model=model)


def ground_truth(config: ml_collections.ConfigDict):
  """(pycocotools COCO, category_ids) of the eval split: label l is `category_ids[l - 1]`
  (`segjax.data.instance_sources`; for COCO, `dataset.category_ids` when set, e.g.
  torchvision's 91, else the annotation file's categories, sorted)."""
  return instance_sources.get(config).ground_truth(config)


class Evaluator:
  """`Evaluator(config, model=..., mesh=...).run(variables) -> dict` of box and mask AP.

  Each process predicts its share of the split under jit and converts its own detections;
  the COCO results of all processes are then gathered, so every process scores the whole
  split. After `run`, `results` holds them (the contents of `detections.json`) by image id.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, model, mesh):
    self.config = config
    self.mesh = mesh
    # Under pmap too the prediction runs under jit, on variables unstacked by `run`.
    self.runner = parallel.runner(config, mesh)
    batch_size = parallel.local_batch_size(config.eval_batch_size, "eval_batch_size")
    kwargs = dict(
      local_batch_size=batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    self.dataset, num_batches = instance_pipeline.instance_eval_dataset(config, **kwargs)
    most = parallel.max_over_processes(num_batches)
    if most != num_batches:  # Every process runs the jitted predict equally often.
      self.dataset, num_batches = instance_pipeline.instance_eval_dataset(
        config, num_batches=most, **kwargs
      )
    self.num_batches = num_batches
    self.gt, self.category_ids = ground_truth(config)
    self.put = functools.partial(parallel.to_global, mesh=mesh)
    replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
    self.predict = jax.jit(
      self.runner.traced(functools.partial(mask_rcnn.predict, model=model)),
      in_shardings=(replicated, sharded),
      out_shardings=sharded,
      compiler_options=self.runner.compiler_options,
    )
    self.results: list[dict] = []

  def detections(self, variables: dict) -> tuple[list[dict], list[int]]:
    """(COCO results, ids of the evaluated images) of this process's share of the split."""
    results, image_ids = [], []
    for batch in numpy_batches(self.dataset, "evaluation data"):
      inputs = self.put({"image": batch["image"], "image_size": batch["image_size"]})
      det = parallel.local_rows(self.predict(variables, inputs))
      results += coco_eval.detections_to_coco_json(
        image_ids=batch["image_id"],
        boxes=det["boxes"],
        scores=det["scores"],
        classes=det["classes"],
        valid=det["valid"],
        category_ids=self.category_ids,
        scale=batch["scale"],
        masks=det["instance_masks"],
        image_size=batch["image_size"],
        original_size=batch["original_size"],
        example_mask=batch["example_mask"],
      )
      image_ids += [int(i) for i in batch["image_id"][batch["example_mask"]]]
    return results, image_ids

  def run(self, variables: dict) -> dict:
    """box_AP, box_AP50, box_AP75, box_APs/m/l and the mask_ equivalents, in [0, 1] or NaN.

    `variables`: in the layout of `config.parallelism`'s steps (`parallel.runner`).
    """
    variables = self.runner.to_global_state(variables)
    shares = parallel.allgather_json(self.detections(variables))
    # Sorted (stably) by image, so the results do not depend on the number of processes.
    self.results = sorted(
      (r for results, _ in shares for r in results), key=lambda r: r["image_id"]
    )
    image_ids = sorted(i for _, ids in shares for i in ids)
    return coco_eval.evaluate_coco(self.gt, self.results, image_ids=image_ids)


# Prediction on new images: the instance half of `segjax.train.tasks.Task`'s prediction seam.


def stride(config: ml_collections.ConfigDict) -> int:
  """What padded sizes must be multiples of: the model's `stride` (32, the FPN's coarsest
  level below P6), as the instance pipeline pads."""
  return models.model_class(config.model.name).stride


def categories(config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """(category_ids, class_names): label l is category `category_ids[l - 1]` (as `ground_truth`
  maps it), named `class_names[l]` (`class_names[0]` the background); the source's
  (`segjax.data.instance_sources`)."""
  return instance_sources.get(config).categories(config)


def _conventions(config: ml_collections.ConfigDict) -> str:
  return config.model.get("conventions", "detectron2")


def preprocess(config: ml_collections.ConfigDict, image: np.ndarray) -> tuple[np.ndarray, dict]:
  """(image, meta): resized by `config.dataset.min_size` / `max_size` exactly as
  `instance_pipeline.instance_eval_dataset` resizes (`instance_ops.resize_shorter_longer`),
  unresized when they are unset: uint8, or for models of `conventions="torchvision"` float32
  on the 0..255 scale, sized and interpolated as torchvision's `GeneralizedRCNNTransform`
  resizes (its normalization commutes with the bilinear weights, so normalizing afterwards,
  as `segjax.predict` does, is the same to float precision). meta: `original_size` and
  `image_size` (the resized (h, w)), `scale` (resized / original)."""
  original = tuple(int(s) for s in image.shape[:2])
  min_size = config.dataset.get("min_size")
  if min_size is None:
    return image, {"original_size": original, "image_size": original, "scale": 1.0}
  features = instance_ops.resize_shorter_longer(
    {
      "image": tf.constant(image),
      "boxes": tf.zeros((0, 4), tf.float32),
      "instance_masks": tf.zeros((0, *original), tf.uint8),
    },
    min_size,
    config.dataset.get("max_size"),
    _conventions(config),
  )
  return features["image"].numpy(), {
    "original_size": original,
    "image_size": tuple(int(s) for s in features["image_size"]),
    "scale": float(features["scale"]),
  }


def bind_predict(config: ml_collections.ConfigDict, model):
  """`predict(variables, batch)`: `segjax.models.mask_rcnn.predict`, detections in the padded
  input image's pixels."""
  del config
  return functools.partial(mask_rcnn.predict, model=model)


# Masks pasted a chunk at a time: 100 float masks of a 12-megapixel photo would take 4.8 GB.
PASTE_CHUNK = 16


@functools.partial(jax.jit, static_argnames=("size", "threshold"))
def _paste_torchvision(mask_probs, boxes, *, size, threshold):
  return ops.masks.paste_mask_probs_torchvision(mask_probs, boxes, size) >= threshold


def paste_in_original(
  mask_probs: np.ndarray, boxes: np.ndarray, original: tuple[int, int], threshold: float = 0.5
) -> np.ndarray:
  """(N, m, m) mask probabilities pasted at boxes (N, 4) of the original image, as
  torchvision's `GeneralizedRCNNTransform.postprocess` pastes them
  (`ops.masks.paste_mask_probs_torchvision` at the original size), then `>= threshold`:
  (N, h, w) bool for `original` (h, w)."""
  n = len(mask_probs)
  out = np.zeros((n, *original), bool)
  for start in range(0, n, PASTE_CHUNK):  # Fixed chunks: one compile per original size.
    probs = np.zeros((PASTE_CHUNK, *mask_probs.shape[1:]), np.float32)
    chunk = np.zeros((PASTE_CHUNK, 4), np.float32)
    rows = min(PASTE_CHUNK, n - start)
    probs[:rows], chunk[:rows] = mask_probs[start : start + rows], boxes[start : start + rows]
    out[start : start + rows] = np.asarray(
      _paste_torchvision(probs, chunk, size=tuple(original), threshold=float(threshold))
    )[:rows]
  return out


def bind_postprocess(config: ml_collections.ConfigDict):
  """`postprocess(prediction, meta, *, score_threshold)`: one image's `predict` output (no
  batch axis, numpy) in original pixels, as the evaluator converts it
  (`coco_eval.original_frame`, `boxes_to_original`, `mask_to_original`): detections valid and
  scoring at least `score_threshold`, best first, {"boxes": (N, 4) float32 `[x1, y1, x2, y2]`,
  "scores": (N,) float32, "labels": (N,) int32 category ids (`categories`), "classes": (N,)
  int32 contiguous labels 1..K, "masks": (N, h, w) bool}.

  Models of `conventions="torchvision"` get their masks as torchvision does instead: the
  m x m probabilities pasted at the boxes in the original image (`paste_in_original`), not
  the masks pasted in the resized input and resized back, whose edges differ by a pixel."""
  category_ids = np.asarray(categories(config)[0], np.int32)
  if len(category_ids) != config.model.roi_heads.num_classes:
    raise ValueError(
      f"The data set has {len(category_ids)} categories but the model "
      f"{config.model.roi_heads.num_classes} classes."
    )
  in_original = _conventions(config) == "torchvision"
  threshold = config.model.roi_heads.get("mask_threshold", 0.5)

  def postprocess(prediction: dict, meta: dict, *, score_threshold: float = 0.5) -> dict:
    keep = np.flatnonzero(
      np.asarray(prediction["valid"], bool) & (np.asarray(prediction["scores"]) >= score_threshold)
    )
    factors, original = coco_eval.original_frame(
      meta["scale"], meta["image_size"], meta["original_size"]
    )
    boxes = coco_eval.boxes_to_original(
      np.asarray(prediction["boxes"])[keep], factors, original
    ).astype(np.float32)
    if in_original:
      masks = paste_in_original(
        np.asarray(prediction["mask_probs"])[keep], boxes, original, threshold
      )
    else:
      masks = (
        np.zeros((0, *original), bool)
        if not len(keep)
        else np.stack(
          [
            coco_eval.mask_to_original(
              prediction["instance_masks"][i], meta["image_size"], original
            )
            for i in keep
          ]
        )
      )
    classes = np.asarray(prediction["classes"], np.int32)[keep]
    return {
      "boxes": boxes,
      "scores": np.asarray(prediction["scores"], np.float32)[keep],
      "labels": category_ids[classes - 1],
      "classes": classes,
      "masks": masks,
    }

  return postprocess


def write_predictions(
  config: ml_collections.ConfigDict,
  directory: str,
  predictions: Iterable[tuple[str, np.ndarray, dict]],
  *,
  overlay: bool = False,
) -> list[str]:
  """Writes `predictions.json` for all (NAME, uint8 image, postprocessed prediction): the COCO
  results format (`image_id` the index in `predictions`, `file_name` NAME, `category_id`,
  `bbox` `[x, y, w, h]` original pixels, `score`, `segmentation` compressed RLE); with
  `overlay`, also `NAME_overlay.png` with masks, boxes, class names and scores. Returns the
  paths written."""
  names = categories(config)[1]
  results, paths = [], []
  for index, (name, image, prediction) in enumerate(predictions):
    for box, score, label, mask in zip(
      prediction["boxes"], prediction["scores"], prediction["labels"], prediction["masks"]
    ):
      x1, y1, x2, y2 = (float(v) for v in box)
      results.append(
        {
          "image_id": index,
          "file_name": name,
          "category_id": int(label),
          "bbox": [x1, y1, x2 - x1, y2 - y1],
          "score": float(score),
          "segmentation": coco_eval.encode_mask(mask),
        }
      )
    if overlay:
      scale = max(1, -(-256 // max(image.shape[:2])))  # Small images upscaled to be legible.
      paths.append(os.path.join(directory, f"{name}_overlay.png"))
      visualize.save_png(
        visualize.draw_instances(
          image,
          prediction["boxes"],
          prediction["classes"],
          prediction["masks"],
          num_classes=config.model.roi_heads.num_classes + 1,
          class_names=names,
          scores=prediction["scores"],
          scale=scale,
        ),
        paths[-1],
      )
  paths.append(os.path.join(directory, "predictions.json"))
  with open(paths[-1], "w") as f:
    json.dump(results, f)
  return paths
