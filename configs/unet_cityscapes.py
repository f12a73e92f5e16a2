"""U-Net on Cityscapes fine annotations (tfds `cityscapes/semantic_segmentation`), 19 classes.

  python train.py --config configs/unet_cityscapes.py --workdir /tmp/unet_cityscapes \
      --config.dataset.data_dir=/data/tensorflow_datasets

Cityscapes needs a manual download: put `leftImg8bit_trainvaltest.zip` and
`gtFine_trainvaltest.zip` in `DATA_DIR/downloads/manual/`; the first run builds the data set.
Label ids are mapped to the 19 train ids, everything else to 255 (ignored). Trains on random
512x1024 crops of images scaled by 0.5-1.0 (from 1024x2048); evaluates on images resized to
512x1024. Several hours on 8 accelerators.
"""

from configs import unet_shapes
from segjax.data.tfds_sources import CITYSCAPES_CLASS_NAMES


def get_config(arg=None):
  del arg
  config = unet_shapes.get_config()
  config.batch_size = 16
  config.eval_batch_size = 16
  config.image_size = (512, 1024)
  config.num_train_steps = 40_000
  config.optimizer = "sgd"
  config.learning_rate = 0.02
  config.weight_decay = 1e-4
  config.warmup_steps = 1000
  config.log_every_steps = 100
  config.eval_every_steps = 4000
  config.checkpoint_every_steps = 2000

  config.dataset.name = "cityscapes"
  config.dataset.train_split = "train"
  config.dataset.eval_split = "validation"
  config.dataset.shuffle_buffer = 500
  config.dataset.class_names = CITYSCAPES_CLASS_NAMES
  config.dataset.train_kwargs = {}
  config.dataset.eval_kwargs = {}
  config.augment.min_scale = 0.25
  config.augment.max_scale = 0.5  # Of the 1024x2048 originals: crops cover 1/4 to all of them.

  config.model.num_classes = len(CITYSCAPES_CLASS_NAMES)
  config.model.depth = 5
  config.model.base_width = 64
  config.model.dropout_rate = 0.1
  return config
