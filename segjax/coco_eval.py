"""COCO detection evaluation (Lin et al. 2014): the results format and box / mask AP.

- `detections_to_coco_json`: batched detections in the padded, resized input image -> the
  COCO results format `[{"image_id", "category_id", "bbox": [x, y, w, h], "score",
  "segmentation": rle}]` in ORIGINAL image coordinates, as detectron2
  `evaluation/coco_evaluation.py` `instances_to_coco_json` (RLE counts as utf-8 text).
- `original_frame`, `boxes_to_original`, `mask_to_original`: that mapping back to original
  pixels for one image, shared with prediction on new images (`segjax.train.instance`).
- `evaluate_coco`: pycocotools `COCOeval` for "bbox" and "segm", returning
  `box_AP, box_AP50, box_AP75, box_APs, box_APm, box_APl` and the same with `mask_`, as
  fractions in [0, 1]; NaN where COCOeval has no ground truth (e.g. no large objects), as
  detectron2 reports.
- `shapes_to_coco`: the shapes split as a COCO ground truth, so that it is scored by the same
  code as COCO.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Sequence

import numpy as np
from absl import logging
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# COCOeval.stats indices 0-5: AP@[.5:.95], AP50, AP75, AP small, medium, large.
AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _resize_bilinear(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """(N, h, w) float -> (N, H, W) with half-pixel centres (tf.image.resize / cv2 INTER_LINEAR)."""

  def weights(n_in, n_out):
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)

  if masks.shape[1:] == tuple(size):
    return masks
  y0, y1, wy = weights(masks.shape[1], size[0])
  x0, x1, wx = weights(masks.shape[2], size[1])
  rows = masks[:, y0] * (1 - wy)[:, None] + masks[:, y1] * wy[:, None]
  return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def encode_mask(mask: np.ndarray) -> dict:
  """A binary (H, W) mask as COCO compressed RLE with utf-8 counts (JSON-serializable)."""
  rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
  rle["counts"] = rle["counts"].decode("utf-8")
  return rle


def original_frame(scale, image_size=None, original_size=None):
  """(factors (4,), original (h, w) or None) of one image: `[x1, y1, x2, y2]` in the resized
  input divided by `factors` are original pixels.

  With `image_size` (h, w) of the resized content, the factors are exact per axis, from
  `original_size` or else `round(image_size / scale)`; without it, both axes divide by `scale`
  and the original size is unknown (None).
  """
  if image_size is None:
    return np.full(4, np.float64(scale)), None
  h, w = (int(v) for v in image_size)
  if original_size is not None:
    oh, ow = (int(v) for v in original_size)
  else:
    oh, ow = int(round(h / scale)), int(round(w / scale))
  return np.array([w / ow, h / oh, w / ow, h / oh]), (oh, ow)


def boxes_to_original(boxes, factors: np.ndarray, original: tuple[int, int] | None) -> np.ndarray:
  """(N, 4) boxes of the resized input -> original pixels (float64), clipped to `original`
  (h, w) when it is known (`original_frame` gives both)."""
  xyxy = np.asarray(boxes, np.float64) / factors
  if original is not None:
    oh, ow = original
    xyxy = np.clip(xyxy, 0, [ow, oh, ow, oh])
  return xyxy


def mask_to_original(
  mask, image_size, original: tuple[int, int], threshold: float = 0.5
) -> np.ndarray:
  """One (Hp, Wp) mask (probabilities or binary) pasted in the padded input -> (oh, ow) bool
  in the original image: cropped to the content `image_size` (h, w), resized bilinearly as
  probabilities, then thresholded."""
  h, w = (int(v) for v in image_size)
  content = np.asarray(mask[:h, :w], np.float32)[None]
  return _resize_bilinear(content, tuple(original))[0] >= threshold


def detections_to_coco_json(
  *,
  image_ids,
  boxes,
  scores,
  classes,
  valid,
  category_ids: Sequence[int],
  scale,
  masks=None,
  image_size=None,
  original_size=None,
  example_mask=None,
  mask_threshold: float = 0.5,
) -> list[dict]:
  """COCO results for a batch of detections (B images, D detections each).

  Args:
    image_ids: (B,) original COCO image ids (the batch's `image_id`).
    boxes: (B, D, 4) `[x1, y1, x2, y2]` in the padded input image.
    scores: (B, D). classes: (B, D) contiguous labels 1..C. valid: (B, D) bool.
    category_ids: label l -> `category_ids[l - 1]` (`segjax.data.coco.CocoInfo.category_ids`).
    scale: (B,) resized / original size (the batch's `scale`).
    masks: optional (B, D, Hp, Wp) probabilities or binary masks pasted in the padded input
      image; needs `image_size`.
    image_size: (B, 2) (h, w) of the content before padding (the batch's `image_size`).
    original_size: (B, 2) (h, w) of the original image (the batch's `original_size`). With
      `image_size` it maps boxes back exactly per axis; without it boxes divide by `scale`
      and masks go to `round(image_size / scale)`.
    example_mask: optional (B,) bool; False rows (eval padding) are skipped.
    mask_threshold: masks are resized as probabilities, then binarized at this value.

  Returns:
    A list of result dicts; boxes clipped to the original image.
  """
  image_ids = np.asarray(image_ids)
  boxes, scores = np.asarray(boxes, np.float64), np.asarray(scores)
  classes, valid = np.asarray(classes), np.asarray(valid, bool)
  scale = np.asarray(scale, np.float64)
  if example_mask is None:
    example_mask = np.ones(len(image_ids), bool)
  if masks is not None and image_size is None:
    raise ValueError("detections_to_coco_json needs image_size to crop masks to the content.")
  results = []
  for b in np.flatnonzero(np.asarray(example_mask, bool)):
    size = None if image_size is None else np.asarray(image_size)[b]
    factors, original = original_frame(
      scale[b], size, None if original_size is None else np.asarray(original_size)[b]
    )
    keep = np.flatnonzero(valid[b])
    if not len(keep):
      continue
    xyxy = boxes_to_original(boxes[b, keep], factors, original)
    for j, i in enumerate(keep):
      x1, y1, x2, y2 = (float(v) for v in xyxy[j])
      result = {
        "image_id": int(image_ids[b]),
        "category_id": int(category_ids[int(classes[b, i]) - 1]),
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "score": float(scores[b, i]),
      }
      if masks is not None:  # One at a time: 100 float masks of 800 x 1333 take 430 MB.
        result["segmentation"] = encode_mask(
          mask_to_original(masks[b, i], size, original, mask_threshold)
        )
      results.append(result)
  return results


def _rasterizable(gt: COCO) -> COCO:
  """`gt`, or a copy without the polygons of fewer than 3 points that pycocotools rejects.

  segjax's COCO source ignores such parts when training (as detectron2 does); here an
  annotation left with none keeps an empty mask, so it still counts as a missed object.
  """

  def ok(p):
    return isinstance(p, list) and len(p) % 2 == 0 and len(p) >= 6

  broken = [
    a
    for a in gt.dataset["annotations"]
    if isinstance(a["segmentation"], list) and not all(ok(p) for p in a["segmentation"])
  ]
  if not broken:
    return gt
  logging.warning(
    "Ground truth: %d annotations have polygons of fewer than 3 points; "
    "scoring masks without those parts.",
    len(broken),
  )
  dataset = copy.deepcopy(gt.dataset)
  for ann in dataset["annotations"]:
    if isinstance(ann["segmentation"], list):
      ann["segmentation"] = [p for p in ann["segmentation"] if ok(p)]
      if not ann["segmentation"]:
        image = gt.imgs[ann["image_id"]]
        ann["segmentation"] = encode_mask(np.zeros((image["height"], image["width"]), np.uint8))
  fixed = COCO()
  fixed.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    fixed.createIndex()
  return fixed


def _nan_metrics(prefix: str) -> dict:
  return {f"{prefix}_{name}": float("nan") for name in AP_NAMES}


# COCOeval's area ranges of AP, AP50, AP75, APs, APm, APl (bounds inclusive, as COCOeval).
_AREA_RANGES = ((0, 1e10),) * 3 + ((0, 32**2), (32**2, 96**2), (96**2, 1e10))


def _metrics_without_results(gt: COCO, image_ids, prefix: str) -> dict:
  """What COCOeval reports when nothing is detected: 0 where the evaluated images have
  (non-crowd) ground truth in the area range, NaN where they have none."""
  images = set(gt.getImgIds() if image_ids is None else (int(i) for i in image_ids))
  areas = [
    a["area"] for a in gt.dataset["annotations"] if a["image_id"] in images and not a["iscrowd"]
  ]
  return {
    f"{prefix}_{name}": 0.0 if any(lo <= a <= hi for a in areas) else float("nan")
    for name, (lo, hi) in zip(AP_NAMES, _AREA_RANGES)
  }


def evaluate_coco(
  gt: COCO | str, results: list[dict] | str, *, image_ids=None, verbose: bool = False
) -> dict[str, float]:
  """Box and (when results carry `segmentation`) mask AP with pycocotools' COCOeval.

  Args:
    gt: the ground truth, a pycocotools COCO or the path of an instances JSON.
    results: a list from `detections_to_coco_json` or the path of such a JSON.
    image_ids: evaluate these images only (default: every ground-truth image; an image
      without detections then counts its objects as missed).
    verbose: print COCOeval's summary tables.

  Returns:
    {"box_AP", ..., "box_APl", "mask_AP", ..., "mask_APl"}: fractions in [0, 1], NaN where
    there is no ground truth; the mask keys are NaN when no result has a segmentation. No
    results at all give zeros for box and mask (NaN where there is no ground truth).
  """
  if isinstance(gt, str):
    with contextlib.redirect_stdout(io.StringIO()):
      gt = COCO(gt)
  if isinstance(results, str):
    with open(results) as f:
      results = json.load(f)
  metrics = {}
  for iou_type, prefix in (("bbox", "box"), ("segm", "mask")):
    if not results:
      metrics.update(_metrics_without_results(gt, image_ids, prefix))
      continue
    if iou_type == "segm" and not any("segmentation" in r for r in results):
      metrics.update(_nan_metrics(prefix))
      continue
    # loadRes mutates the dicts; for masks it must not see boxes, or it takes box areas for
    # the small/medium/large ranges (detectron2 `_evaluate_predictions_on_coco`).
    dets = copy.deepcopy(results)
    scored_gt = gt
    if iou_type == "segm":
      scored_gt = _rasterizable(gt)
      for d in dets:
        d.pop("bbox", None)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
      coco_eval = COCOeval(scored_gt, scored_gt.loadRes(dets), iou_type)
      if image_ids is not None:
        coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
      coco_eval.evaluate()
      coco_eval.accumulate()
      coco_eval.summarize()
    if verbose:
      print(stdout.getvalue())
    else:
      logging.info("COCOeval %s:\n%s", iou_type, stdout.getvalue())
    metrics.update(
      {
        f"{prefix}_{name}": float(v) if v >= 0 else float("nan")
        for name, v in zip(AP_NAMES, coco_eval.stats[: len(AP_NAMES)])
      }
    )
  return metrics


def shapes_to_coco(
  split: str = "validation",
  *,
  num_examples: int = 2000,
  image_size: tuple[int, int] = (64, 64),
  seed: int = 0,
  max_shapes: int = 4,
  max_instances: int = 8,
  process_count: int = 1,
) -> COCO:
  """The shapes split (`segjax.data.shapes`) as a COCO ground truth.

  Takes the shapes source's arguments, so `shapes_to_coco(split, **config.dataset.eval_kwargs)`
  matches the evaluation data; image ids are example indices, category ids the class ids
  1..4 with their names. `process_count` is accepted and ignored: the ground truth is the
  whole split. Masks are compressed RLE of the visible part, boxes from the mask.
  """
  from segjax.data.shapes import CLASS_NAMES, generate_example  # Lazy: it imports TensorFlow.

  del process_count
  height, width = image_size
  images, annotations = [], []
  for index in range(num_examples):
    example = generate_example(seed, split, index, tuple(image_size), max_shapes, max_instances)
    images.append(
      {"id": index, "file_name": f"{split}_{index:06d}.png", "height": height, "width": width}
    )
    for k in np.flatnonzero(example["valid"]):
      rle = encode_mask(example["instance_masks"][k])
      annotations.append(
        {
          "id": len(annotations) + 1,
          "image_id": index,
          "category_id": int(example["classes"][k]),
          "segmentation": rle,
          "area": float(mask_util.area(rle)),
          "bbox": [float(v) for v in mask_util.toBbox(rle)],
          "iscrowd": 0,
        }
      )
  coco = COCO()
  coco.dataset = {
    "images": images,
    "annotations": annotations,
    "categories": [{"id": i, "name": n} for i, n in enumerate(CLASS_NAMES) if i > 0],
  }
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco
