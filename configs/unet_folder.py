"""U-Net on your own images: a folder of images with same-named PNG masks of class ids.

  python train.py --config configs/unet_folder.py:NUM_CLASSES --workdir /tmp/unet_folder \
      --config.dataset.data_dir=/path/to/data

Layout (`dataset.images_dir`, `masks_dir`, `mask_pattern`; segjax/data/folder.py): by default
DATA_DIR/{train,validation}/images/NAME.{jpg,png} and DATA_DIR/{train,validation}/masks/NAME.png
(single-channel or palette PNG of class ids 0..NUM_CLASSES-1; 255 = ignore). SegNet's CamVid:

  --config.dataset.images_dir='{split}' --config.dataset.masks_dir='{split}annot' \
      --config.dataset.eval_split=val --config.dataset.ignore_label=11

One folder split by name order: --config.dataset.images_dir=images --config.dataset.masks_dir=masks
--config.dataset.train_split='all[:80%]' --config.dataset.eval_split='all[80%:]'.

Trains on random `image_size` crops; evaluates every validation image whole at its native size
(padded to the split's largest image, rounded up to 2**depth), scored on the original masks.
"""

import ml_collections

from configs import unet_shapes


def get_config(arg=None):
  num_classes = int(arg) if arg else 2
  config = unet_shapes.get_config()
  config.image_size = (256, 256)
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_train_steps = 5000
  config.learning_rate = 1e-3
  config.warmup_steps = 200
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000

  config.dataset.name = "folder"
  config.dataset.train_split = "train"
  config.dataset.eval_split = "validation"
  config.dataset.images_dir = "{split}/images"  # Under data_dir; without {split}: split "all".
  config.dataset.masks_dir = "{split}/masks"
  config.dataset.mask_pattern = "{stem}.png"  # A mask's name from its image's stem.
  config.dataset.shuffle_buffer = 1000  # File names (decoded after shuffling).
  config.dataset.class_names = tuple(f"class_{i}" for i in range(num_classes))
  config.dataset.train_kwargs = {}
  config.dataset.eval_kwargs = {}
  config.augment.min_scale = 0.5
  config.augment.max_scale = 1.5

  config.evaluation = ml_collections.ConfigDict()
  config.evaluation.mode = "whole"  # Or "resize" (to image_size) or "slide".
  config.evaluation.shorter_side = 0  # Native size.
  # The canvas every evaluation image is padded to; None: measured on the split once.
  config.evaluation.max_size = ml_collections.config_dict.placeholder(tuple)
  config.evaluation.crop_size = ml_collections.config_dict.placeholder(tuple)  # slide only
  config.evaluation.stride = ml_collections.config_dict.placeholder(tuple)  # slide only
  config.evaluation.flip = False
  config.evaluation.scales = (1.0,)

  config.model.num_classes = num_classes
  config.model.depth = 4
  config.model.base_width = 32
  return config
