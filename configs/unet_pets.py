"""U-Net on Oxford-IIIT Pet (tfds `oxford_iiit_pet`): background / pet / border trimaps.

  python train.py --config configs/unet_pets.py --workdir /tmp/unet_pets \
      --config.dataset.data_dir=~/tensorflow_datasets

The first run builds the tfds data set (about 800 MB download) unless `data_dir` already
holds it. About 1 hour on one modern GPU; `:cpu` shrinks it to a few minutes on a laptop.
"""

from configs import unet_shapes
from segjax.data.tfds_sources import OXFORD_IIIT_PET_CLASS_NAMES


def get_config(arg=None):
  config = unet_shapes.get_config()
  config.batch_size = 32
  config.eval_batch_size = 64
  config.image_size = (256, 256)
  config.num_train_steps = 20_000
  config.learning_rate = 1e-3
  config.warmup_steps = 500
  config.log_every_steps = 100
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 2000

  config.dataset.name = "oxford_iiit_pet"
  config.dataset.train_split = "train"
  config.dataset.eval_split = "test"
  config.dataset.shuffle_buffer = 1000
  config.dataset.class_names = OXFORD_IIIT_PET_CLASS_NAMES
  config.dataset.train_kwargs = {}
  config.dataset.eval_kwargs = {}
  config.augment.min_scale = 0.5
  config.augment.max_scale = 2.0

  config.model.num_classes = len(OXFORD_IIIT_PET_CLASS_NAMES)
  config.model.depth = 4
  config.model.base_width = 64
  config.model.dropout_rate = 0.1

  if arg == "cpu":
    config.batch_size = 8
    config.image_size = (128, 128)
    config.num_train_steps = 500
    config.warmup_steps = 50
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 250
    config.model.base_width = 16
  return config
