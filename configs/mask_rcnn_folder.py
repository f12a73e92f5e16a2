"""Mask R-CNN on your own instance masks (images of about 320 to 512 pixels), fine-tuned from
torchvision's COCO-trained R50-FPN.

  python -m segjax.weights.torchvision --arch maskrcnn_resnet50_fpn \
      --input maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --workdir workdirs/tv_coco
  python train.py --config configs/mask_rcnn_folder.py:NUM_CLASSES --workdir workdirs/mine \
      --config.dataset.data_dir=DATA_DIR --config.init_from=workdirs/tv_coco

NUM_CLASSES counts the foreground classes (1 by default). DATA_DIR holds images and PNG masks
of instance ids, 0 = background (`dataset.name = "instance_folder"`, segjax/data/to_coco.py):
by default `{train,validation}/images/NAME.jpg|png` and `{train,validation}/masks/NAME.png`;
PennFudanPed as it is unpacked:

  --config.dataset.images_dir=PNGImages --config.dataset.masks_dir=PedMasks \
  --config.dataset.mask_pattern='{stem}_mask.png' \
  --config.dataset.train_split='all[:120]' --config.dataset.eval_split='all[120:]'

With several classes, a second PNG of class ids per pixel (`dataset.classes_dir`) or a JSON
`{stem: {instance id: class id}}` (`dataset.classes_file`) gives each instance its class, and
`dataset.class_names` names them, background first. Images are resized so that their longer
side is 512 (`dataset.min_size`, `max_size`) and padded to a 512 x 512 canvas (`image_size`);
`dataset.max_instances` caps the instances of an image (check with
`python -m segjax.data.scan_instances`). Evaluation: COCO box and mask AP on the eval split.
`:NUM_CLASSES,tiny` is a seconds-long CPU variant (small backbone from scratch) for tests.
"""

import ml_collections

from segjax.weights.torchvision import model_config


def get_config(arg=None):
  words = [w for w in (arg or "").split(",") if w]
  tiny = "tiny" in words
  numbers = [w for w in words if w != "tiny"]
  num_classes = int(numbers[0]) if numbers else 1
  config = model_config("maskrcnn_resnet50_fpn", num_classes=num_classes)
  config.batch_size = 4
  config.eval_batch_size = 4
  config.image_size = (512, 512)
  config.num_train_steps = 2000
  config.optimizer = "sgd"
  config.learning_rate = 0.01
  config.weight_decay = 1e-4
  config.schedule = "cosine"
  config.warmup_steps = 100
  config.log_every_steps = 20
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  # XLA options by platform (segjax/train/xla_options.py): XLA:CPU's memory-optimized
  # schedule; the R50-FPN train step holds 0.97 instead of 1.31 GiB of temporaries.
  config.compiler_options = ml_collections.ConfigDict(
    {"cpu": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}}
  )
  # On the CPU, oneDNN's convolutions where it loads, else XLA's ("onednn", "xla").
  config.cpu_convolutions = "auto"

  dataset = config.dataset = ml_collections.ConfigDict()
  dataset.name = "instance_folder"
  dataset.data_dir = ml_collections.config_dict.placeholder(str)
  dataset.train_split = "train"
  dataset.eval_split = "validation"
  dataset.images_dir = "{split}/images"
  dataset.masks_dir = "{split}/masks"
  dataset.mask_pattern = "{stem}.png"
  dataset.classes_dir = ml_collections.config_dict.placeholder(str)
  dataset.classes_file = ml_collections.config_dict.placeholder(str)
  dataset.class_names = ("background",) + (
    ("object",) if num_classes == 1 else tuple(f"class_{i}" for i in range(1, num_classes + 1))
  )
  dataset.max_instances = 32
  # S > 0: training masks cropped to their boxes at S x S on the host, K S^2 floats an image
  # instead of K H W bytes (segjax/data/instance_pipeline.py; TPU Mask R-CNN uses 112).
  dataset.cropped_mask_size = 0
  dataset.overflow = "truncate"
  dataset.min_size = 512
  dataset.max_size = 512

  if tiny:
    config.model = ml_collections.ConfigDict(
      dict(
        name="mask_rcnn",
        dtype="float32",
        backbone=dict(depth=18, base_width=8, norm="bn", freeze_at=0),
        fpn=dict(out_channels=16),
        rpn=dict(
          anchor_sizes=((8,), (16,), (32,), (64,), (128,)),
          pre_nms_topk_train=64,
          pre_nms_topk_test=32,
          post_nms_topk_train=48,
          post_nms_topk_test=24,
          batch_size_per_image=64,
        ),
        roi_heads=dict(
          num_classes=num_classes,
          batch_size_per_image=32,
          fc_dims=(32, 32),
          mask_conv_dims=(16, 16),
          mask_upsampling="transpose",
          sampling_ratio=2,
          detections_per_image=8,
        ),
      )
    )
    config.optimizer = "adamw"
    config.learning_rate = 3e-3
    config.image_size = (64, 64)
    dataset.min_size = dataset.max_size = 64
    dataset.max_instances = 8
    config.batch_size = 2
    config.eval_batch_size = 2
    config.num_train_steps = 4
    config.warmup_steps = 0
    config.log_every_steps = 2
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 4
  return config
