"""What the loop runs for each model: training data, loss and evaluator, by `config.model.name`.

One explicit dict: "unet" is semantic segmentation (`semantic.py`, `evaluator.py`),
"mask_rcnn" instance segmentation (`instance.py`). The loop and `evaluation.py` call only
these functions, so they never look at the model's type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections

from segjax.data import instance_pipeline, pipeline
from segjax.train import instance, semantic, visualizations
from segjax.train.evaluator import Evaluator


@dataclasses.dataclass(frozen=True)
class Task:
  """Attributes:
    train_dataset: `(config, *, local_batch_size, process_index, process_count)` -> an
      infinite tf.data dataset of batches.
    bind_loss: `(config, model)` -> `loss_fn(variables, batch, rng, *, train[, axis_name])`
      for `segjax.train.steps.train_step`.
    evaluator: the class of `Evaluator(config, model=..., mesh=...).run(variables) -> dict`.
    visualize: `(config, evaluator, model, variables, directory, count)` -> paths of PNG
      panels of the first `count` examples of the evaluator's dataset.
  """
  train_dataset: Callable
  bind_loss: Callable
  evaluator: type
  visualize: Callable


TASKS = {
  "unet": Task(pipeline.train_dataset, semantic.bind_loss, Evaluator,
               visualizations.write_semantic),
  "mask_rcnn": Task(instance_pipeline.instance_train_dataset, instance.bind_loss,
                    instance.Evaluator, visualizations.write_instance),
}


def get_task(config: ml_collections.ConfigDict) -> Task:
  name = config.model.name
  if name not in TASKS:
    raise ValueError(f"No task for config.model.name={name!r}; known: {sorted(TASKS)}.")
  return TASKS[name]
