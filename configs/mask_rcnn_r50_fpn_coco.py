"""Mask R-CNN R50-FPN on COCO 2017: detectron2's `mask_rcnn_R_50_FPN_1x` recipe.

Starts from an ImageNet ResNet-50, as detectron2 does: import torchvision's weights (the file
of `torchvision.models.ResNet50_Weights.IMAGENET1K_V1`, fetched by the user), then train:

  python -m segjax.weights.torchvision --arch resnet50 --input resnet50-0676ba61.pth \
      --workdir workdirs/resnet50_imagenet
  python train.py --config configs/mask_rcnn_r50_fpn_coco.py --workdir workdirs/mask_rcnn_coco \
      --config.dataset.data_dir=/data/coco --config.init_from=workdirs/resnet50_imagenet
  python evaluate.py --config configs/mask_rcnn_r50_fpn_coco.py \
      --workdir workdirs/mask_rcnn_coco --config.dataset.data_dir=/data/coco

`init_from` is required: the backbone has frozen batch norm and its stem and res2 frozen
(detectron2 FREEZE_AT=2), parts that never train, so a fresh run without the ImageNet weights
stops with a ConfigError (`segjax/train/init_from.py`). Training from scratch needs trainable
normalisation everywhere: configs/mask_rcnn_r50_fpn_coco_scratch_gn.py.

`data_dir` holds `annotations/instances_{train,val}2017.json` and `{train,val}2017/` images.
16 images per batch (over all devices), SGD momentum 0.9, lr 0.02 with a 1000-step linear
warm-up, times 0.1 at 60k and 80k of 90k steps, weight decay 1e-4 (not on the frozen
weights); shorter side 800 (detectron2 samples 640..800), longer at most 1333, padded to
1344 x 1344; horizontal flip. 80 classes: labels 1..80 are the sorted COCO category ids,
background 0 (detectron2's 81 scores). detectron2 reports 38.6 box / 35.2 mask AP with its
MSRA ResNet-50; torchvision's ImageNet weights are a different initialisation.
`--config.parallelism` must stay "jit" (instance evaluation runs under jit).
"""

import ml_collections


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 16
  config.eval_batch_size = 8
  config.image_size = (1344, 1344)  # 1333 rounded up to a multiple of 32.
  config.num_train_steps = 90_000
  config.optimizer = "sgd"  # Momentum 0.9.
  config.learning_rate = 0.02
  config.weight_decay = 1e-4
  config.schedule = "piecewise"
  config.lr_boundaries = (60_000, 80_000)
  config.lr_decay_factor = 0.1
  config.warmup_steps = 1000
  config.grad_clip_norm = 0.0
  config.log_every_steps = 20
  config.eval_every_steps = 90_000  # detectron2 evaluates once, at the end.
  config.checkpoint_every_steps = 5000
  config.parallelism = "jit"
  # XLA options by platform (segjax/train/xla_options.py): XLA:CPU's memory-optimized
  # schedule; the R50-FPN train step holds 0.97 instead of 1.31 GiB of temporaries.
  config.compiler_options = ml_collections.ConfigDict(
    {"cpu": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}}
  )
  # On the CPU, oneDNN's convolutions where it loads, else XLA's ("onednn", "xla").
  config.cpu_convolutions = "auto"
  # Required: a workdir (train.py or `python -m segjax.weights.torchvision`) whose latest
  # checkpoint initialises a fresh run; here the imported ImageNet ResNet-50.
  config.init_from = ml_collections.config_dict.placeholder(str)

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "coco"
  config.dataset.data_dir = ml_collections.config_dict.placeholder(str)
  config.dataset.train_split = "train2017"
  config.dataset.eval_split = "val2017"
  config.dataset.max_instances = 100  # Check with `python -m segjax.data.scan_instances`.
  # S > 0: training masks cropped to their boxes at S x S on the host, K S^2 floats an image
  # instead of K H W bytes (segjax/data/instance_pipeline.py; TPU Mask R-CNN uses 112).
  config.dataset.cropped_mask_size = 0
  config.dataset.overflow = "truncate"
  config.dataset.min_size = 800
  config.dataset.max_size = 1333

  config.augment = ml_collections.ConfigDict()
  config.augment.flip = True

  config.model = ml_collections.ConfigDict()
  config.model.name = "mask_rcnn"  # The module defaults are the detectron2 1x settings.
  config.model.dtype = "float32"  # Computation dtype ("bfloat16"); parameters stay float32.
  config.model.backbone = ml_collections.ConfigDict(
    dict(depth=50, norm="frozen_bn", freeze_at=2)
  )  # Only with init_from (docstring).
  config.model.roi_heads = ml_collections.ConfigDict(
    dict(num_classes=80, mask_upsampling="transpose")
  )
  return config
