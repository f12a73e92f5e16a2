"""torchvision's Mask R-CNN R50-FPN: evaluate imported COCO weights, or fine-tune from them.

  python -m segjax.weights.torchvision --arch maskrcnn_resnet50_fpn \
      --input maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --workdir workdirs/tv_coco
  python evaluate.py --config configs/mask_rcnn_torchvision.py --workdir workdirs/tv_coco \
      --config.dataset.data_dir=/data/coco
  python train.py --config configs/mask_rcnn_torchvision.py:shapes --workdir workdirs/tv_shapes \
      --config.init_from=workdirs/tv_coco

The default is `segjax.weights.torchvision.model_config`: the COCO recipe with torchvision's 91
labels (class names and category ids recorded). ":shapes" fine-tunes the same architecture on
the embedded shapes set (4 classes, 128 x 128): the class-dependent predictors are
re-initialised, everything else starts from `init_from`.
"""

import ml_collections

from configs import mask_rcnn_shapes
from segjax.weights.torchvision import model_config


def get_config(arg=None):
  config = model_config("maskrcnn_resnet50_fpn")
  if arg is None:
    return config
  if arg != "shapes":
    raise ValueError(f"Unknown variant {arg!r}; known: shapes.")
  shapes = mask_rcnn_shapes.get_config()
  model = config.model
  model.rpn = ml_collections.ConfigDict(dict(
    anchor_sizes=((8,), (16,), (32,), (64,), (128,)), pre_nms_topk_train=512,
    pre_nms_topk_test=256, post_nms_topk_train=256, post_nms_topk_test=128,
    batch_size_per_image=128))
  model.roi_heads = ml_collections.ConfigDict(dict(
    num_classes=len(shapes.dataset.class_names) - 1, batch_size_per_image=128,
    detections_per_image=16))
  shapes.model = model
  shapes.image_size = (128, 128)
  shapes.batch_size = 4
  shapes.num_train_steps = 1000
  shapes.learning_rate = 1e-4
  shapes.warmup_steps = 100
  return shapes
