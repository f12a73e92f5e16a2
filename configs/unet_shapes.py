"""U-Net on the embedded shapes data set: the quickstart.

  python train.py --config configs/unet_shapes.py --workdir /tmp/unet_shapes

About 3 minutes on a 2-core CPU (2000 steps at 90-110 images/s); reaches a validation mean
IoU of 0.90-0.92 (0.8995 on a 2-core Intel Xeon with oneDNN's convolutions, 0.9055 there with
XLA's; 0.923 on an AMD EPYC, 0.914 there with XLA:CPU's default YNNPACK kernels).
`--config configs/unet_shapes.py:tiny` is a seconds-long version for smoke tests.
"""

import ml_collections

from segjax.data.shapes import CLASS_NAMES


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 8
  config.eval_batch_size = 50
  config.image_size = (64, 64)
  config.num_train_steps = 2000
  config.optimizer = "adamw"
  config.learning_rate = 3e-3
  config.weight_decay = 1e-4
  config.schedule = "cosine"
  config.warmup_steps = 50
  config.grad_clip_norm = 0.0
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.parallelism = "jit"  # Or "pmap"; either splits `batch_size` over all devices.
  # XLA options by platform (segjax/train/xla_options.py): on CPU, Eigen's convolutions
  # rather than YNNPACK's fusions make this U-Net's steps 1.15-1.24x faster.
  config.compiler_options = ml_collections.ConfigDict(
    {"cpu": {"xla_cpu_experimental_ynn_fusion_type": ""}}
  )
  # On the CPU, oneDNN's convolutions where it loads, else XLA's ("onednn", "xla").
  config.cpu_convolutions = "auto"

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "shapes"
  config.dataset.data_dir = ml_collections.config_dict.placeholder(str)
  config.dataset.train_split = "train"
  config.dataset.eval_split = "validation"
  config.dataset.ignore_label = 255
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
  config.augment.min_scale = 0.75
  config.augment.max_scale = 1.25
  config.augment.flip = True

  config.model = ml_collections.ConfigDict()
  config.model.name = "unet"
  config.model.num_classes = len(CLASS_NAMES)
  config.model.depth = 4
  config.model.base_width = 16
  config.model.norm = "bn"
  config.model.dropout_rate = 0.0
  config.model.upsampling = "transpose"
  config.model.dtype = "float32"  # Computation dtype ("bfloat16"); parameters stay float32.

  if arg == "tiny":
    config.batch_size = 4
    config.eval_batch_size = 6
    config.image_size = (32, 32)
    config.num_train_steps = 20
    config.warmup_steps = 2
    config.log_every_steps = 5
    config.eval_every_steps = 10
    config.checkpoint_every_steps = 10
    config.dataset.train_kwargs.num_examples = 40
    config.dataset.eval_kwargs.num_examples = 10
    config.model.depth = 2
    config.model.base_width = 8
  return config
