"""U-Net with a ResNet-18 encoder on the embedded shapes data set, from torchvision weights.

  python -m segjax.weights.torchvision --arch resnet18 --input resnet18-f37072fd.pth \
      --workdir /tmp/tv_resnet18
  python train.py --config configs/unet_resnet_shapes.py --workdir /tmp/unet_resnet_shapes \
      --config.init_from=/tmp/tv_resnet18

It needs `init_from`: the encoder's batch norm is frozen (`backbone.norm="frozen_bn"`, the
imported statistics and affine terms kept), because batch statistics over 8 images of 64 x 64
(C5 is 2 x 2) are noise that stalls training (segjax/models/unet_resnet.py); without weights to
import, set `--config.model.backbone.norm=gn`. The decoder is narrower than
segmentation_models_pytorch's (256, 128, 64, 32, 16) to keep a CPU run short. The recipe is
configs/unet_shapes.py's (2000 steps of 8 images) at a smaller learning rate for the full-width
encoder. tests/weights/test_unet_resnet_import.py runs it from a torchvision ResNet-18 with
random weights with SEGJAX_LONG_TESTS=1 and requires a validation mean IoU of 0.85, which this
recipe does not yet reach from random weights: measured 0.22, 0.27, 0.30 and 0.31 at steps
500, 1000, 1500 and 2000 (about 30 minutes on a busy 2-core CPU).
`:tiny` is a seconds-long version with a narrow encoder (`backbone.base_width=8`, trainable
batch norm, so no torchvision weights fit it and none are needed) for smoke tests.
"""

import ml_collections

from configs import unet_shapes


def get_config(arg=None):
  config = unet_shapes.get_config(arg)
  # Below unet_shapes.py's 3e-3: Adam's steps are large next to 512-channel convs' weights.
  config.learning_rate = 1e-3
  # A workdir whose latest checkpoint's variables (by path) initialise a fresh run
  # (segjax/train/init_from.py): `python -m segjax.weights.torchvision --arch resnet18`'s.
  config.init_from = ml_collections.config_dict.placeholder(str)

  config.model = ml_collections.ConfigDict()
  config.model.name = "unet_resnet"
  config.model.num_classes = len(config.dataset.class_names)
  config.model.backbone = ml_collections.ConfigDict(dict(depth=18, norm="frozen_bn", freeze_at=0))
  config.model.decoder_channels = (64, 32, 16, 16, 8)
  config.model.decoder_norm = "batch"

  if arg == "tiny":  # unet_shapes.py's tiny run settings, half as long.
    config.num_train_steps = 10
    config.model.backbone.base_width = 8
    config.model.backbone.norm = "bn"
    config.model.decoder_channels = (32, 16, 16, 8, 8)
  return config
