"""torchvision's Mask R-CNN R50-FPN (v1, or v2): evaluate imported COCO weights, or fine-tune.

  python -m segjax.weights.torchvision --arch maskrcnn_resnet50_fpn \
      --input maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --workdir workdirs/tv_coco
  python evaluate.py --config configs/mask_rcnn_torchvision.py --workdir workdirs/tv_coco \
      --config.dataset.data_dir=/data/coco
  python train.py --config configs/mask_rcnn_torchvision.py:shapes --workdir workdirs/tv_shapes \
      --config.init_from=workdirs/tv_coco

The default is `segjax.weights.torchvision.model_config`: the COCO recipe with torchvision's 91
labels (class names and category ids recorded). The argument, comma-separated words:
  * "v2": `maskrcnn_resnet50_fpn_v2` (BatchNorm in the backbone, FPN and heads, two RPN convs,
    the 4conv1fc box head; 47.4 box / 41.8 mask AP in torchvision's table), imported with
    `--arch maskrcnn_resnet50_fpn_v2 --input maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth`;
    `:v2` to evaluate it, `:v2,shapes` to fine-tune it;
  * "shapes": fine-tunes the architecture on the embedded shapes set (4 classes, 128 x 128):
    the class-dependent predictors are re-initialised, everything else starts from
    `init_from`.
"""

import ml_collections

from configs import mask_rcnn_shapes
from segjax.weights.torchvision import model_config

VARIANTS = ("v2", "shapes")


def get_config(arg=None):
  words = [w for w in (arg or "").split(",") if w]
  unknown = sorted(set(words) - set(VARIANTS))
  if unknown:
    raise ValueError(f"Unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}.")
  config = model_config("maskrcnn_resnet50_fpn_v2" if "v2" in words else "maskrcnn_resnet50_fpn")
  if "shapes" not in words:
    return config
  shapes = mask_rcnn_shapes.get_config()
  model = config.model
  # Updated, not replaced: the arch's own fields (v2's rpn.num_convs, box head, norms) stay.
  model.rpn = ml_collections.ConfigDict(
    dict(
      model.get("rpn", {}),
      anchor_sizes=((8,), (16,), (32,), (64,), (128,)),
      pre_nms_topk_train=512,
      pre_nms_topk_test=256,
      post_nms_topk_train=256,
      post_nms_topk_test=128,
      batch_size_per_image=128,
    )
  )
  model.roi_heads.update(
    dict(
      num_classes=len(shapes.dataset.class_names) - 1,
      batch_size_per_image=128,
      detections_per_image=16,
    )
  )
  shapes.model = model
  shapes.image_size = (128, 128)
  shapes.batch_size = 4
  shapes.num_train_steps = 1000
  shapes.learning_rate = 1e-4
  shapes.warmup_steps = 100
  return shapes
