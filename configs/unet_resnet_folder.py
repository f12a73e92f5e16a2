"""U-Net with an ImageNet ResNet-34 encoder on your own images (segmentation_models_pytorch's
`Unet("resnet34")`): a folder of images with same-named PNG masks of class ids.

  python -m segjax.weights.torchvision --arch resnet34 --input resnet34-b627a593.pth \
      --workdir /tmp/tv_resnet34
  python train.py --config configs/unet_resnet_folder.py:NUM_CLASSES \
      --workdir /tmp/unet_resnet_folder --config.dataset.data_dir=/path/to/data \
      --config.init_from=/tmp/tv_resnet34

The weights file is torchvision's (https://download.pytorch.org/models/resnet34-b627a593.pth);
`--arch resnet18/resnet50/resnet101` with `--config.model.backbone.depth=18/50/101` take the
others. Without `init_from` the encoder starts from random weights.

Layout: DATA_DIR/{train,validation}/images/NAME.{jpg,png} and
DATA_DIR/{train,validation}/masks/NAME.png (single-channel or palette PNG; 255 = ignore).

Trains on random `image_size` crops; evaluates every validation image whole at its native size
(padded to the split's largest image, rounded up to a multiple of 32), scored on the original
masks.
"""

import ml_collections

from configs import unet_folder


def get_config(arg=None):
  config = unet_folder.get_config(arg)
  # Fine-tuning a pretrained encoder: a smaller step than unet_folder's from-scratch 1e-3.
  config.learning_rate = 3e-4
  # A workdir whose latest checkpoint's variables (by path) initialise a fresh run
  # (segjax/train/init_from.py): `python -m segjax.weights.torchvision --arch resnet34`'s.
  config.init_from = ml_collections.config_dict.placeholder(str)

  num_classes = config.model.num_classes
  config.model = ml_collections.ConfigDict()
  config.model.name = "unet_resnet"
  config.model.dtype = "float32"  # Computation dtype ("bfloat16"); parameters stay float32.
  config.model.num_classes = num_classes
  # Trainable BatchNorm, nothing frozen (smp); the imported running statistics are the start.
  config.model.backbone = ml_collections.ConfigDict(dict(depth=34, norm="bn", freeze_at=0))
  config.model.decoder_channels = (256, 128, 64, 32, 16)
  config.model.decoder_norm = "bn"
  return config
