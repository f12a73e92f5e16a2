"""Prediction on new images with a trained workdir: `Predictor`, and what `predict.py` runs.

`Predictor.from_workdir(workdir)` rebuilds the model of `workdir/config.json`, restores the
model variables of the latest checkpoint, and maps uint8 (H, W, 3) images to, per task
(`segjax.train.tasks`):
  semantic ("unet"): {"labels": int32 (H, W), "probs": float32 (H, W, K)}.
  instance ("mask_rcnn"): detections scoring at least `score_threshold`, best first:
    {"boxes": float32 (N, 4) `[x1, y1, x2, y2]` original pixels, "scores": float32 (N,),
    "labels": int32 (N,) the data set's category ids (COCO ids; shapes: its class ids),
    "classes": int32 (N,) the model's labels 1..K, "masks": bool (N, H, W)}.

Each image goes through the task's `preprocess` (instance models resize by the eval
pipeline's shorter/longer-side rule; semantic models never resize), is normalized and padded
with zeros (the eval pipelines' padding value) bottom and right to its bucket: height and
width rounded up to a multiple of lcm(`bucket`, the task's stride). The bucket depends on the
image's size only, so a prediction does not depend on the images batched with it, and a
folder of varied images compiles once per bucket shape. Batches always hold `batch_size`
rows; missing rows are zero images of size 0 and are dropped. Outputs are cropped (semantic)
or mapped back (instance, with the evaluator's `segjax.coco_eval` functions) to the original
image.

The default `bucket` (None) pads only to the stride, so an image whose sides are multiples of
it is predicted exactly as the evaluator predicts it, but every distinct size compiles anew;
`predict.py` uses buckets of 64 to bound the compiles. Padding is not invisible to a
convolutional network (pixels whose receptive field reaches past the image see it), so
predictions near the bottom and right edges can differ slightly between bucket sizes.
"""

from __future__ import annotations

import glob
import math
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax.data.images import read_image
from segjax.data.ops import IMAGENET_MEAN, IMAGENET_STD
from segjax.models import build_model
from segjax.train import evaluation, parallel, run_config, tasks, xla_options

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def for_inference(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` that predicts under plain jit, whatever parallelism it trained with."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.parallelism = "jit"
  return config


def normalize_padded(images: jax.Array, image_size: jax.Array) -> jax.Array:
  """(B, H, W, 3) uint8 (or float on the 0..255 scale) -> float32 standardized as
  `segjax.data.ops.normalize`, and 0 outside each image's content: the top-left `image_size`
  (B, 2) (h, w)."""
  x = images.astype(jnp.float32)
  x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
  rows = jnp.arange(images.shape[1])[None, :, None] < image_size[:, 0, None, None]
  cols = jnp.arange(images.shape[2])[None, None, :] < image_size[:, 1, None, None]
  return jnp.where((rows & cols)[..., None], x, 0.0)


def inference_fn(predict: Callable) -> Callable:
  """`infer(variables, images, image_size) -> dict` (jittable): images (B, H, W, 3) (uint8 or
  float 0..255), padded bottom and right, of content sizes `image_size` (B, 2) int32,
  normalized, padding zeroed, then `predict(variables, batch)` (a task's `bind_predict`; the
  outputs are in the padded input's pixels)."""

  def infer(variables, images, image_size):
    image_size = jnp.asarray(image_size, jnp.int32)
    batch = {"image": normalize_padded(images, image_size), "image_size": image_size}
    return predict(variables, batch)

  return infer


def padded_size(size: Sequence[int], multiple: int) -> tuple[int, int]:
  """(h, w) rounded up to multiples of `multiple`."""
  return tuple(-(-int(s) // multiple) * multiple for s in size[:2])


def _check_image(image, index: int) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
    raise ValueError(
      f"Image {index} must be a uint8 (H, W, 3) array; got {image.dtype} {image.shape}."
    )
  return image


class Predictor:
  """`Predictor(config, variables)(image) -> dict` (module docstring), or from a workdir.

  Attributes:
    config: the model's config. task: its `segjax.train.tasks.Task`. model, variables.
    batch_size: rows of every jitted call. score_threshold: instance detections kept.
    multiple: padded sizes are multiples of it: lcm(bucket, the task's stride).
    infer: the jitted `inference_fn`, `(variables, images, image_size) -> dict`.
    step: the restored checkpoint's step (None unless `from_workdir`).
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    variables: dict,
    *,
    model=None,
    batch_size: int = 1,
    bucket: int | None = None,
    score_threshold: float = 0.5,
  ):
    if batch_size < 1 or (bucket is not None and bucket < 1):
      raise ValueError(f"batch_size={batch_size} and bucket={bucket} must be positive.")
    self.config = for_inference(config)
    self.task = tasks.get_task(self.config)
    self.model = build_model(self.config) if model is None else model
    self.variables = variables
    self.batch_size = batch_size
    self.score_threshold = score_threshold
    self.multiple = math.lcm(bucket or 1, self.task.stride(self.config))
    self.postprocess = self.task.bind_postprocess(self.config)
    self.infer = xla_options.jit(
      inference_fn(self.task.bind_predict(self.config, self.model)), self.config
    )
    self.step = None

  @classmethod
  def from_workdir(
    cls, workdir: str, config: ml_collections.ConfigDict | None = None, **kwargs
  ) -> Predictor:
    """The latest checkpoint of `workdir` (model variables only), with `config` or else
    `workdir/config.json`; `kwargs` as the constructor's."""
    config = for_inference(run_config.load(workdir) if config is None else config)
    model = build_model(config)
    variables, step = evaluation.restore_variables(config, workdir, model, parallel.make_mesh())
    predictor = cls(config, variables, model=model, **kwargs)
    predictor.step = step
    return predictor

  def padded_size(self, size: Sequence[int]) -> tuple[int, int]:
    """The bucket of a preprocessed image of (h, w) `size`."""
    return padded_size(size, self.multiple)

  def __call__(self, image: np.ndarray) -> dict:
    return self.predict_batch([image])[0]

  def predict_batch(self, images: Sequence[np.ndarray]) -> list[dict]:
    """One prediction per image, in order: images grouped by bucket, `batch_size` a call."""
    prepared = [
      self.task.preprocess(self.config, _check_image(image, i)) for i, image in enumerate(images)
    ]
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, (image, _) in enumerate(prepared):
      buckets.setdefault(self.padded_size(image.shape), []).append(i)
    outputs: list[dict | None] = [None] * len(prepared)
    for size, indices in buckets.items():
      for start in range(0, len(indices), self.batch_size):
        rows = indices[start : start + self.batch_size]
        dtype = np.result_type(*(prepared[i][0].dtype for i in rows))
        batch = np.zeros((self.batch_size, *size, 3), dtype)
        sizes = np.zeros((self.batch_size, 2), np.int32)
        for row, i in enumerate(rows):
          image = prepared[i][0]
          batch[row, : image.shape[0], : image.shape[1]] = image
          sizes[row] = image.shape[:2]
        out = jax.device_get(self.infer(self.variables, batch, sizes))
        for row, i in enumerate(rows):
          outputs[i] = self.postprocess(
            jax.tree.map(lambda a, r=row: a[r], out),
            prepared[i][1],
            score_threshold=self.score_threshold,
          )
    return outputs


def list_images(inputs: Sequence[str]) -> list[str]:
  """The image files named by `inputs`: files as given, a directory's files with an image
  extension (sorted, not recursive), a glob pattern's matches (sorted). An input that names
  nothing is an error naming it."""
  paths = []
  for spec in inputs:
    if os.path.isdir(spec):
      found = sorted(
        os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_EXTENSIONS)
      )
    elif os.path.exists(spec):
      found = [spec]
    else:
      found = sorted(glob.glob(spec))
    if not found:
      raise FileNotFoundError(f"Input {spec!r} is no file, holds no images or matches nothing.")
    paths += [p for p in found if p not in paths]
  return paths


def output_names(paths: Sequence[str]) -> list[str]:
  """Each file's name without its extension; two files of one name are an error."""
  names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  first: dict[str, str] = {}
  for name, path in zip(names, paths):
    if name in first:
      raise ValueError(f"{first[name]} and {path} would write the same outputs {name!r}.")
    first[name] = path
  return names


def predict_to_directory(
  predictor: Predictor,
  paths: Sequence[str],
  output: str,
  *,
  overlay: bool = False,
  chunk: int | None = None,
  log: Callable[[str], object] = print,
) -> list[str]:
  """Predicts on the image files `paths` and writes the task's outputs to `output`
  (`Task.write_predictions`), reading `chunk` images at a time (default 4 batches) and
  logging progress in images/s. Returns the paths written."""
  names = output_names(paths)
  chunk = chunk or 4 * predictor.batch_size
  os.makedirs(output, exist_ok=True)

  def predictions():
    start = time.perf_counter()
    for first in range(0, len(paths), chunk):
      images = [read_image(p) for p in paths[first : first + chunk]]
      yield from zip(names[first : first + chunk], images, predictor.predict_batch(images))
      done = min(first + chunk, len(paths))
      log(f"{done}/{len(paths)} images, {done / (time.perf_counter() - start):.1f} images/s")

  return predictor.task.write_predictions(predictor.config, output, predictions(), overlay=overlay)
