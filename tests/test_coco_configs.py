"""The COCO recipes build: configs/mask_rcnn_r50_fpn_coco.py (ImageNet ResNet-50 through
`init_from`, frozen batch norm) and configs/mask_rcnn_r50_fpn_coco_scratch_gn.py (GroupNorm
everywhere, nothing frozen, from scratch)."""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from configs import mask_rcnn_r50_fpn_coco, mask_rcnn_r50_fpn_coco_scratch_gn
from segjax.errors import ConfigError
from segjax.models import create_model
from segjax.train import init_from
from segjax.train.state import frozen_params

CONFIGS = {"coco": mask_rcnn_r50_fpn_coco, "scratch_gn": mask_rcnn_r50_fpn_coco_scratch_gn}
R50_NORMS = 1 + 3 * (3 + 4 + 6 + 3) + 4  # Stem, three per bottleneck, one per shortcut.


def init_shapes(config):
  """(model, variable shapes, {module path: module}) of `config.model` with 3 classes on a
  128 x 128 image, every module called recorded."""
  config.model.roi_heads.num_classes = 3
  model = create_model(config.model)
  called = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      called["/".join(context.module.path)] = context.module
    return next_fun(*args, **kwargs)

  init = lambda rng, x: model.init(rng, x, train=False, method=type(model).initialize)
  with nn.intercept_methods(record):
    variables = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 128, 128, 3)))
  return model, variables, called


def count_by_part(paths):
  """{part: count} with part the top-level module, or roi_heads/<head>."""
  parts = [p.split("/")[: 2 if p.startswith("roi_heads/") else 1] for p in paths]
  return collections.Counter("/".join(p) for p in parts)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_builds_and_inits(name):
  config = CONFIGS[name].get_config()
  assert config.dataset.name == "coco" and config.model.name == "mask_rcnn"
  model, variables, _ = init_shapes(config)
  params = traverse_util.flatten_dict(variables["params"])
  assert params[("roi_heads", "box_head", "cls_score", "kernel")].shape == (1024, 4)
  assert {p[0] for p in params} == {"backbone", "fpn", "rpn", "roi_heads"}


def test_imagenet_recipe_freezes_the_backbone_and_requires_init_from():
  config = mask_rcnn_r50_fpn_coco.get_config()
  assert config.init_from is None  # A placeholder the command line fills.
  model, variables, called = init_shapes(config)
  assert (model.backbone.depth, model.backbone.norm, model.backbone.freeze_at) == (
    50,
    "frozen_bn",
    2,
  )
  stats = traverse_util.flatten_dict(variables["batch_stats"])
  assert {p[0] for p in stats} == {"backbone"} and len(stats) == 4 * R50_NORMS
  assert {type(m).__name__ for m in called.values()} >= {"FrozenBatchNorm"}
  with pytest.raises(ConfigError) as error:
    init_from.check_frozen_backbone(config, model)
  for key in ("model.backbone.norm", "model.backbone.freeze_at", "init_from"):
    assert key in str(error.value)


def test_scratch_recipe_has_group_norm_everywhere_and_nothing_frozen():
  config = mask_rcnn_r50_fpn_coco_scratch_gn.get_config()
  assert config.get("init_from") is None
  assert (config.num_train_steps, tuple(config.lr_boundaries)) == (270_000, (210_000, 250_000))
  model, variables, called = init_shapes(config)
  assert "batch_stats" not in variables  # No batch norm of any kind.
  norms = {path: m for path, m in called.items() if isinstance(m, nn.GroupNorm)}
  assert {m.num_groups for m in norms.values()} == {32}
  assert not [
    p
    for p, m in called.items()
    if type(m).__name__ in ("BatchNorm", "FrozenBatchNorm", "LayerNorm")
  ]
  # GroupNorm after every conv of the backbone, the FPN and the box and mask heads; the RPN
  # head has none (detectron2's StandardRPNHead).
  assert count_by_part(norms) == {
    "backbone": R50_NORMS,
    "fpn": 8,
    "roi_heads/box_head": 4,
    "roi_heads/mask_head": 4,
  }
  # Every scale/bias pair of the parameters belongs to one of those GroupNorms.
  params = traverse_util.flatten_dict(variables["params"])
  assert {"/".join(p[:-1]) for p in params if p[-1] == "scale"} == set(norms)
  # 4conv1fc box head: four 3x3 convs of 256, one fc of 1024.
  box = {
    "/".join(p[2:]): v.shape
    for p, v in params.items()
    if p[:2] == ("roi_heads", "box_head") and p[-1] == "kernel"
  }
  assert [box[f"conv{i}/kernel"] for i in range(1, 5)] == [(3, 3, 256, 256)] * 4
  assert box["fc1/kernel"] == (7 * 7 * 256, 1024) and "fc2/kernel" not in box
  # Nothing frozen: every parameter trains and gets weight decay; no init_from needed.
  assert model.backbone.freeze_at == 0
  assert not any(jax.tree.leaves(frozen_params(model, variables["params"])))
  init_from.check_frozen_backbone(config, model)
