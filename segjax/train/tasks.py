"""What the loop runs for each kind of model: training data, loss and evaluator, and how
prediction on new images (`segjax.predict`, `segjax.export`) prepares, runs and converts back.

One explicit dict keyed by task: "semantic" segmentation (`semantic.py`, `evaluator.py`) and
"instance" segmentation (`instance.py`). A model class names its task (`UNet.task =
"semantic"`), so a new model of a known task needs no entry here. The loop, `evaluation.py`
and `segjax.predict` call only these functions, so they never look at the model's type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections

from segjax import models
from segjax.data import instance_pipeline, pipeline
from segjax.errors import ConfigError
from segjax.train import instance, semantic, visualizations
from segjax.train.evaluator import Evaluator


@dataclasses.dataclass(frozen=True)
class Task:
  """Attributes:
  train_dataset: `(config, *, local_batch_size, process_index, process_count)` -> an
    infinite tf.data dataset of batches.
  bind_loss: `(config, model)` -> `loss_fn(variables, batch, rng, *, train)`
    for `segjax.train.steps.train_step`.
  evaluator: the class of `Evaluator(config, model=..., mesh=...).run(variables) -> dict`.
  visualize: `(config, evaluator, model, variables, directory, count)` -> paths of PNG
    panels of the first `count` examples of the evaluator's dataset.
  stride: `(config)` -> int, what a padded prediction input's height and width must be
    multiples of.
  preprocess: `(config, image)` -> `(image, meta)`: a uint8 (H, W, 3) image resized as the
    eval pipeline would (unpadded; uint8, or float32 on the 0..255 scale when resized), and
    meta {"original_size": (H, W), "image_size": (h, w) after resizing, "scale": h / H}.
  bind_predict: `(config, model)` -> `predict(variables, batch)` -> dict of (B, ...) arrays,
    jittable: the model on `batch` {"image": (B, Hp, Wp, 3) normalized, 0 on padding,
    "image_size": (B, 2)}, with the config's evaluation settings (semantic: whole/slide
    windows, flip and scale test-time augmentation).
  bind_postprocess: `(config)` -> `postprocess(prediction, meta, *, score_threshold)`: one
    image's `predict` output (numpy, no batch axis) in the original image's pixels.
  write_predictions: `(config, directory, predictions, *, overlay)` -> paths written, for
    an iterable of (name, uint8 image, postprocessed prediction).
  """

  train_dataset: Callable
  bind_loss: Callable
  evaluator: type
  visualize: Callable
  stride: Callable
  preprocess: Callable
  bind_predict: Callable
  bind_postprocess: Callable
  write_predictions: Callable


TASKS = {
  "semantic": Task(
    pipeline.train_dataset,
    semantic.bind_loss,
    Evaluator,
    visualizations.write_semantic,
    semantic.stride,
    semantic.preprocess,
    semantic.bind_predict,
    semantic.bind_postprocess,
    semantic.write_predictions,
  ),
  "instance": Task(
    instance_pipeline.instance_train_dataset,
    instance.bind_loss,
    instance.Evaluator,
    visualizations.write_instance,
    instance.stride,
    instance.preprocess,
    instance.bind_predict,
    instance.bind_postprocess,
    instance.write_predictions,
  ),
}


def get_task(config: ml_collections.ConfigDict) -> Task:
  """The task of `config.model.name`'s model class."""
  task = models.model_class(config.model.name).task
  if task not in TASKS:
    raise ConfigError(f"Model {config.model.name!r} has task {task!r}; known: {sorted(TASKS)}.")
  return TASKS[task]
