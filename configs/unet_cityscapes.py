"""U-Net on Cityscapes fine annotations (tfds `cityscapes/semantic_segmentation`), 19 classes.

  python train.py --config configs/unet_cityscapes.py --workdir /tmp/unet_cityscapes \
      --config.dataset.data_dir=/data/tensorflow_datasets

Cityscapes needs a manual download: put `leftImg8bit_trainvaltest.zip` and
`gtFine_trainvaltest.zip` in `DATA_DIR/downloads/manual/`; the first run builds the data set.
Label ids are mapped to the 19 train ids, everything else to 255 (ignored). Trains on random
512x1024 crops of images scaled by 0.25-0.5 (from 1024x2048); evaluates whole validation frames
scaled by 0.5, the predictions resized back to and scored on the original 1024x2048 labels.
Several hours on 8 accelerators.
"""

import ml_collections

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

  # Scored on the original 1024x2048 labels, as published numbers are. The frames are seen at
  # half size (shorter side 512), the largest scale training shows (0.25-0.5): at native size
  # objects would be 2-4x larger than any the model learnt. Half a frame is one training crop,
  # so "whole" fits in memory; "slide" (crop_size=image_size) would be the mode for a model
  # trained at native scale, whose whole frames need 4x a crop's activations per image.
  config.evaluation = ml_collections.ConfigDict()
  config.evaluation.mode = "whole"
  config.evaluation.shorter_side = 512
  config.evaluation.max_size = (1024, 2048)  # Every Cityscapes frame: no pass to measure.
  config.evaluation.crop_size = config.get_ref("image_size")  # For mode "slide".
  config.evaluation.stride = (341, 683)  # mmseg's 2/3 overlap, for mode "slide".
  config.evaluation.flip = False
  config.evaluation.scales = (1.0,)

  config.model.num_classes = len(CITYSCAPES_CLASS_NAMES)
  config.model.depth = 5
  config.model.base_width = 64
  config.model.dropout_rate = 0.1
  return config
