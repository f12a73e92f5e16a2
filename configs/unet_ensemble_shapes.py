"""An ensemble of 3 U-Nets on the shapes data set, trained together in one jitted step.

  python train.py --config configs/unet_ensemble_shapes.py --workdir /tmp/unet_ensemble_shapes

`configs/unet_shapes.py` with `ensemble_size = 3` (`segjax.models.ensemble`): three U-Nets
from different initial parameters see the same batches; each is trained on its own loss.
Evaluation reports the ensemble (the mean of the members' softmax) under the usual keys and
each member as `member_{i}/mean_iou`, ...; `predict.py` predicts with the ensemble. Roughly
four times the single U-Net's 6 minutes on a 2-core CPU (estimated from
benchmarks/ensemble_step.py: a step of 3 members costs 1.3 single steps x 3 there).
`--config configs/unet_ensemble_shapes.py:tiny` is a seconds-long version for smoke tests.
"""

from configs import unet_shapes


def get_config(arg=None):
  config = unet_shapes.get_config(arg)
  config.ensemble_size = 3
  # True: each member trains on its own batch_size / 3 examples of each batch.
  config.ensemble_split_batch = False
  return config
