"""Instance segmentation task (Mask R-CNN): the loss for the train step, and COCO evaluation.

The evaluator runs the jitted `segjax.models.mask_rcnn.predict` over the instance eval split
(`segjax.data.instance_pipeline.instance_eval_dataset`), writes the detections in the COCO
results format in original image coordinates (`segjax.coco_eval.detections_to_coco_json`)
and scores them with pycocotools' COCOeval against the split's ground truth: the COCO JSON
for dataset "coco", `segjax.coco_eval.shapes_to_coco` for "shapes". With several processes,
each converts the detections of its share and all gather the results before scoring.
"""

from __future__ import annotations

import functools

import jax
import ml_collections

from segjax import coco_eval
from segjax.data import coco, instance_pipeline
from segjax.data.iteration import numpy_batches
from segjax.models import mask_rcnn
from segjax.train import parallel


def loss_fn(variables: dict, batch: dict, rng: jax.Array, *, model, train: bool,
            axis_name: str | None = None) -> tuple:
  """`mask_rcnn.loss_fn`; under pmap (`axis_name`) the step's mean over devices is the loss
  of the global batch, as detectron2 averages its per-GPU losses."""
  del axis_name
  return mask_rcnn.loss_fn(variables, batch, rng, model=model, train=train)


def bind_loss(config: ml_collections.ConfigDict, model):
  del config
  return functools.partial(loss_fn, model=model)


def ground_truth(config: ml_collections.ConfigDict):
  """(pycocotools COCO, category_ids) of the eval split: label l is `category_ids[l - 1]`."""
  dataset = config.dataset
  kwargs = dict(dataset.get("eval_kwargs", {}))
  if dataset.name == "shapes":
    gt = coco_eval.shapes_to_coco(dataset.eval_split, max_instances=dataset.max_instances,
                                  **kwargs)
    return gt, tuple(sorted(gt.getCatIds()))
  if dataset.name == "coco":
    annotation_file = kwargs.get("annotation_file") or coco.default_annotation_file(
      dataset.data_dir, dataset.eval_split)
    info = coco.load_coco(annotation_file)
    return info.coco, info.category_ids
  raise ValueError(f"No ground truth for dataset.name {dataset.name!r}; known: shapes, coco.")


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
    self.parallelism = parallel.check_parallelism(config.get("parallelism", "jit"))
    batch_size = parallel.local_batch_size(config.eval_batch_size, "eval_batch_size")
    kwargs = dict(local_batch_size=batch_size, process_index=jax.process_index(),
                  process_count=jax.process_count())
    self.dataset, num_batches = instance_pipeline.instance_eval_dataset(config, **kwargs)
    most = parallel.max_over_processes(num_batches)
    if most != num_batches:  # Every process runs the jitted predict equally often.
      self.dataset, num_batches = instance_pipeline.instance_eval_dataset(
        config, num_batches=most, **kwargs)
    self.num_batches = num_batches
    self.gt, self.category_ids = ground_truth(config)
    self.put = functools.partial(parallel.to_global, mesh=mesh)
    replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
    self.predict = jax.jit(functools.partial(mask_rcnn.predict, model=model),
                           in_shardings=(replicated, sharded), out_shardings=sharded)
    self.results: list[dict] = []

  def detections(self, variables: dict) -> tuple[list[dict], list[int]]:
    """(COCO results, ids of the evaluated images) of this process's share of the split."""
    results, image_ids = [], []
    for batch in numpy_batches(self.dataset, "evaluation data"):
      inputs = self.put({"image": batch["image"], "image_size": batch["image_size"]})
      det = parallel.local_rows(self.predict(variables, inputs))
      results += coco_eval.detections_to_coco_json(
        image_ids=batch["image_id"], boxes=det["boxes"], scores=det["scores"],
        classes=det["classes"], valid=det["valid"], category_ids=self.category_ids,
        scale=batch["scale"], masks=det["instance_masks"], image_size=batch["image_size"],
        original_size=batch["original_size"], example_mask=batch["example_mask"])
      image_ids += [int(i) for i in batch["image_id"][batch["example_mask"]]]
    return results, image_ids

  def run(self, variables: dict) -> dict:
    """box_AP, box_AP50, box_AP75, box_APs/m/l and the mask_ equivalents, in [0, 1] or NaN.

    `variables`: replicated global arrays (jit), or stacked per device (pmap).
    """
    if self.parallelism == "pmap":
      variables = parallel.from_pmap_state(variables, self.mesh)
    shares = parallel.allgather_json(self.detections(variables))
    # Sorted (stably) by image, so the results do not depend on the number of processes.
    self.results = sorted((r for results, _ in shares for r in results),
                          key=lambda r: r["image_id"])
    image_ids = sorted(i for _, ids in shares for i in ids)
    return coco_eval.evaluate_coco(self.gt, self.results, image_ids=image_ids)
