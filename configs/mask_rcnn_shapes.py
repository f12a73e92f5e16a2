"""Mask R-CNN (ResNet-18-style FPN, 16 base channels) on the embedded shapes set, on a CPU.

  python train.py --config configs/mask_rcnn_shapes.py --workdir /tmp/mask_rcnn_shapes
  python evaluate.py --config configs/mask_rcnn_shapes.py --workdir /tmp/mask_rcnn_shapes

`evaluate.py` writes box and mask AP to `eval_metrics.json` and the COCO results to
`detections.json`. 1500 steps of batch 8 reach box AP50 0.915 and mask AP50 0.886 (box AP
0.683, mask AP 0.651) on the 200 validation images, in about 20 minutes on a 2-core CPU
(0.66 s per step). 64 x 64 images with 1 to 4 shapes, 4 classes; the heads are narrowed to
match (64-channel FPN, 128-d box head, two 64-channel mask convolutions, few proposals).
`--config configs/mask_rcnn_shapes.py:tiny` is a seconds-long version for smoke tests.
"""

import ml_collections

from segjax.data.shapes import CLASS_NAMES


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 8
  config.eval_batch_size = 50
  config.image_size = (64, 64)
  config.num_train_steps = 1500
  config.optimizer = "adamw"
  config.learning_rate = 1e-3
  config.weight_decay = 1e-4
  config.schedule = "cosine"
  config.warmup_steps = 200
  config.grad_clip_norm = 10.0
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.parallelism = "jit"  # Or "pmap"; instance evaluation runs under jit either way.
  # XLA options by platform (segjax/train/xla_options.py): XLA:CPU's memory-optimized
  # schedule; the R50-FPN train step holds 0.97 instead of 1.31 GiB of temporaries.
  config.compiler_options = ml_collections.ConfigDict(
    {"cpu": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}}
  )
  # On the CPU, oneDNN's convolutions where it loads, else XLA's ("onednn", "xla").
  config.cpu_convolutions = "auto"
  # A workdir (train.py or `python -m segjax.weights.torchvision`) whose latest checkpoint
  # initialises a fresh run (segjax/train/init_from.py).
  config.init_from = ml_collections.config_dict.placeholder(str)

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "shapes"
  config.dataset.data_dir = ml_collections.config_dict.placeholder(str)
  config.dataset.train_split = "train"
  config.dataset.eval_split = "validation"
  config.dataset.max_instances = 8
  # S > 0: training masks cropped to their boxes at S x S on the host, K S^2 floats an image
  # instead of K H W bytes (segjax/data/instance_pipeline.py; TPU Mask R-CNN uses 112).
  config.dataset.cropped_mask_size = 0
  config.dataset.shuffle_buffer = 2000
  config.dataset.class_names = CLASS_NAMES
  # Generated at the training size: a reference, so `--config.image_size` carries over.
  config.dataset.train_kwargs = ml_collections.ConfigDict(
    dict(num_examples=2000, image_size=config.get_ref("image_size"))
  )
  config.dataset.eval_kwargs = ml_collections.ConfigDict(
    dict(num_examples=200, image_size=config.get_ref("image_size"))
  )

  config.augment = ml_collections.ConfigDict()
  config.augment.flip = True

  config.model = ml_collections.ConfigDict()
  config.model.name = "mask_rcnn"
  config.model.dtype = "float32"  # Computation dtype ("bfloat16"); parameters stay float32.
  config.model.backbone = ml_collections.ConfigDict(
    dict(depth=18, base_width=16, norm="bn", freeze_at=0)
  )
  config.model.fpn = ml_collections.ConfigDict(dict(out_channels=64))
  config.model.rpn = ml_collections.ConfigDict(
    dict(
      anchor_sizes=((8,), (16,), (32,), (64,), (128,)),  # One size per level P2..P6.
      pre_nms_topk_train=256,
      pre_nms_topk_test=128,
      post_nms_topk_train=128,
      post_nms_topk_test=64,
      batch_size_per_image=64,
    )
  )
  config.model.roi_heads = ml_collections.ConfigDict(
    dict(
      num_classes=len(CLASS_NAMES) - 1,
      batch_size_per_image=64,
      fc_dims=(128, 128),
      mask_conv_dims=(64, 64),
      mask_upsampling="transpose",  # Or "nearest", "bilinear" (segjax.layers.upsample).
      sampling_ratio=2,
      detections_per_image=16,
    )
  )

  if arg == "tiny":
    config.batch_size = 2
    config.eval_batch_size = 4
    config.num_train_steps = 20
    config.learning_rate = 3e-3
    config.warmup_steps = 0
    config.log_every_steps = 5
    config.eval_every_steps = 20
    config.checkpoint_every_steps = 20
    config.dataset.train_kwargs.num_examples = 16
    config.dataset.eval_kwargs.num_examples = 4
    config.model.backbone.base_width = 8
    config.model.fpn.out_channels = 16
    config.model.rpn.update(
      dict(
        pre_nms_topk_train=64, pre_nms_topk_test=32, post_nms_topk_train=48, post_nms_topk_test=24
      )
    )
    config.model.roi_heads.update(
      dict(
        batch_size_per_image=32, fc_dims=(32, 32), mask_conv_dims=(16, 16), detections_per_image=8
      )
    )
  return config
