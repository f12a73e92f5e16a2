"""Issue #10: a U-Net whose ResNet-18 encoder comes from an imported torchvision checkpoint
(`python -m segjax.weights.torchvision --arch resnet18`, then `init_from`) starts from exactly
the imported tensors and trains with its features' scale kept; with SEGJAX_LONG_TESTS=1,
configs/unet_resnet_shapes.py's whole run must reach a validation mean IoU of at least 0.85."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct, traverse_util

from configs import unet_resnet_shapes
from segjax.data import ops, shapes
from segjax.models import build_model
from segjax.train import init_from, loop
from segjax.weights import torchvision as tvw
from tests.markers import long_test, rbg_prng
from tests.weights.conftest import random_images, randomize_and_calibrate

pytest.importorskip("torch")  # Only where the `torch` extra is missing; CI installs it.

# Its own group: nothing here needs the Mask R-CNN fixtures of "torchvision_import".
pytestmark = pytest.mark.xdist_group("unet_resnet_import")


@pytest.fixture(scope="module")
def resnet18_import(tmp_path_factory):
  """(torchvision ResNet-18 file with random, calibrated weights, workdir it was imported to)."""
  import torch
  import torchvision

  torch.manual_seed(0)
  model = torchvision.models.resnet18(weights=None)
  randomize_and_calibrate(model, model, random_images(2, 64, 64, seed=1))
  root = tmp_path_factory.mktemp("tv_resnet18")
  path, workdir = str(root / "resnet18.pth"), str(root / "imported")
  torch.save(model.state_dict(), path)
  tvw.import_weights("resnet18", path, workdir)
  return path, workdir


def flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def train(config, workdir, monkeypatch):
  """(eval metrics, flat variables of the state before step 1) of `train_and_evaluate`."""
  seen = {}

  def load(config, state):
    state = load_pretrained(config, state)
    seen["start"] = flat(
      jax.tree.map(np.asarray, {"params": state.params, "batch_stats": state.batch_stats})
    )
    return state

  load_pretrained = init_from.maybe_load_pretrained
  monkeypatch.setattr(init_from, "maybe_load_pretrained", load)
  with rbg_prng():
    metrics = loop.train_and_evaluate(config, workdir)
  return metrics, seen["start"]


def encoder_scales(config, images):
  """variables -> {stage: standard deviation of the encoder's output on `images`} as the
  decoder sees it in training (batch statistics for a trainable batch norm)."""

  def scales(variables):
    variables = traverse_util.unflatten_dict(variables, sep="/")
    model = build_model(config)
    (_, aux), _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return {k: jnp.std(aux[k]) for k in ("c2", "c3", "c4", "c5")}

  return jax.jit(scales)


def shapes_images(n, size):
  """n shapes validation images, normalized as the pipeline does."""
  images = [shapes.generate_example(0, "validation", i, size)["image"] for i in range(n)]
  mean, std = np.asarray(ops.IMAGENET_MEAN), np.asarray(ops.IMAGENET_STD)
  return jnp.asarray((np.stack(images) - mean) / std, jnp.float32)


@long_test  # In CI, the import: test_norm_scale_and_bias_load_across_frozen_and_trainable_layouts.
def test_unet_starts_from_the_imported_resnet18_and_trains(
  tmp_path, resnet18_import, capsys, monkeypatch
):
  """configs/unet_resnet_shapes.py for 5 steps. A trainable BatchNorm's scale and bias come
  from the other collection: test_norm_scale_and_bias_load_across_frozen_and_trainable_...."""
  path, import_dir = resnet18_import
  # torchvision's tensors in FrozenBatchNorm layout (scale, bias, mean, var in "batch_stats").
  imported = flat(tvw.convert(tvw.read_state_dict(path), "resnet18"))
  config = unet_resnet_shapes.get_config()
  config.init_from = import_dir
  norm = config.model.backbone.norm
  config.num_train_steps = config.log_every_steps = config.eval_every_steps = 5
  config.checkpoint_every_steps = 5
  config.warmup_steps = 0
  config.model.decoder_channels = (64, 32, 16, 16, 8)  # The encoder is what is checked here.
  config.dataset.eval_kwargs.num_examples = config.eval_batch_size = 8
  workdir = str(tmp_path / "unet")
  metrics, start = train(config, workdir, monkeypatch)

  # Before step 1 the encoder holds the imported tensors; a trainable BatchNorm ("bn") takes
  # its scale and bias from FrozenBatchNorm's "batch_stats" into "params".
  moved = lambda k: (
    k.replace("batch_stats/", "params/")
    if norm == "bn"
    and k.endswith(  # noqa: E731
      ("/scale", "/bias")
    )
    else k
  )
  assert {k for k in start if "/backbone/" in k} == {moved(k) for k in imported}
  for name, value in imported.items():
    np.testing.assert_array_equal(start[moved(name)], value, name)
  out = capsys.readouterr().out
  assert f"Initialised from {import_dir} (step 0): 100 loaded ({{'backbone': 100}})" in out
  assert "skipped: params/backbone" not in out and "skipped: batch_stats/backbone" not in out
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert np.isfinite(json.loads(f.readline())["loss"])
  assert 0 <= metrics["mean_iou"] <= 1

  # The encoder's features keep their scale in training. With frozen batch norm nothing
  # renormalizes the encoder: these 5 Adam steps multiplied C4's standard deviation by 1.7e3
  # and C5's by 2.4e5, the decoder's skips drown, and training stalls near 0.3 mean IoU.
  end, _ = init_from.read_variables(workdir)
  scales = encoder_scales(config, shapes_images(8, config.image_size))
  before, after = scales(start), scales({"/".join(k): v for k, v in end.items()})
  for stage in before:
    assert 0.25 < float(after[stage] / before[stage]) < 4, (stage, before, after)


@pytest.mark.skipif(
  not os.environ.get("SEGJAX_LONG_TESTS"), reason="trains for minutes: set SEGJAX_LONG_TESTS=1"
)
def test_unet_with_imported_resnet18_trains_on_shapes_to_085_miou(
  tmp_path, resnet18_import, monkeypatch
):
  config = unet_resnet_shapes.get_config()
  config.init_from = resnet18_import[1]
  metrics, _ = train(config, str(tmp_path / "unet"), monkeypatch)
  assert metrics["mean_iou"] >= 0.85, metrics


@struct.dataclass
class State:
  params: dict
  batch_stats: dict


def test_norm_scale_and_bias_load_across_frozen_and_trainable_layouts(resnet18_import):
  """The import writes FrozenBatchNorm (all four vectors in "batch_stats"); a trainable
  BatchNorm takes its scale and bias into "params", a frozen one as they are, a norm without
  running statistics (GroupNorm) nothing."""
  path, import_dir = resnet18_import
  imported = flat(tvw.convert(tvw.read_state_dict(path), "resnet18"))
  z = lambda: jnp.zeros((64,))  # noqa: E731
  state = State(
    params={
      "backbone": {
        "stem_norm": {"scale": z(), "bias": z()},  # "bn"
        "res2_0": {"norm1": {"scale": z(), "bias": z()}},
      }
    },  # "gn"
    batch_stats={
      "backbone": {
        "stem_norm": {"mean": z(), "var": z()},
        "res2_0": {"norm2": {k: z() for k in ("scale", "bias", "mean", "var")}},
      }
    },
  )  # "frozen_bn"
  state, summary = init_from.load_pretrained(import_dir, state)
  bn, frozen = "backbone/stem_norm", "backbone/res2_0/norm2"
  assert sorted(summary["loaded"]) == sorted(
    [f"params/{bn}/scale", f"params/{bn}/bias", f"batch_stats/{bn}/mean", f"batch_stats/{bn}/var"]
    + [f"batch_stats/{frozen}/{k}" for k in ("scale", "bias", "mean", "var")]
  )
  assert sorted(summary["only_in_model"]) == [
    "params/backbone/res2_0/norm1/bias",
    "params/backbone/res2_0/norm1/scale",
  ]
  skipped = set(summary["only_in_checkpoint"])
  assert f"batch_stats/{bn}/scale" not in skipped
  assert "batch_stats/backbone/res2_0/norm1/scale" in skipped
  got = flat({"params": state.params, "batch_stats": state.batch_stats})
  for name in summary["loaded"]:
    source = name.replace("params/", "batch_stats/")
    np.testing.assert_array_equal(got[name], imported[source], name)
  assert not np.any(got["params/backbone/res2_0/norm1/scale"])
