"""Tests for segjax/models/fpn.py: pyramid shapes, torchvision parameter count, top-down wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models import fpn

KEY = jax.random.key(0, impl="rbg")


def num_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def stages(sizes, channels, batch=1, seed=0):
  rng = np.random.default_rng(seed)
  return {
    f"c{l}": jnp.asarray(rng.normal(size=(batch, *s, c)), jnp.float32)
    for l, s, c in zip(range(2, 6), sizes, channels)
  }


def test_r50_shapes_and_parameter_count():
  c = stages([(16, 24), (8, 12), (4, 6), (2, 3)], (256, 512, 1024, 2048), batch=2)
  model = fpn.FPN()
  variables, (out, aux) = jax.eval_shape(lambda: model.init_with_output(KEY, c)[::-1])
  assert {k: v.shape for k, v in out.items()} == {
    "p2": (2, 16, 24, 256),
    "p3": (2, 8, 12, 256),
    "p4": (2, 4, 6, 256),
    "p5": (2, 2, 3, 256),
    "p6": (2, 1, 2, 256),
  }
  assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
  assert sorted(aux) == ["top_down_2", "top_down_3", "top_down_4", "top_down_5"]
  # torchvision FeaturePyramidNetwork([256, 512, 1024, 2048], 256): 984,064 + 2,360,320.
  assert num_params(variables["params"]) == 3_344_384


def test_top_down_sums_p6_and_odd_sizes():
  sizes = [(9, 7), (5, 4), (3, 2), (2, 1)]  # ceil halving, as a ResNet gives for 33 x 25
  c = stages(sizes, (2, 3, 4, 5))
  model = fpn.FPN(out_channels=3)
  (out, aux), variables = jax.jit(model.init_with_output)(KEY, c)
  p = variables["params"]
  lateral = {
    l: np.einsum("bhwc,cd->bhwd", c[f"c{l}"], p[f"lateral_{l}"]["kernel"][0, 0])
    + p[f"lateral_{l}"]["bias"]
    for l in range(2, 6)
  }
  expected = lateral[5]
  np.testing.assert_allclose(aux["top_down_5"], expected, rtol=1e-5, atol=1e-5)
  for l in (4, 3, 2):
    up = np.repeat(np.repeat(expected, 2, axis=1), 2, axis=2)[
      :, : sizes[l - 2][0], : sizes[l - 2][1]
    ]
    expected = lateral[l] + up
    np.testing.assert_allclose(aux[f"top_down_{l}"], expected, rtol=1e-5, atol=1e-5)
  assert [out[f"p{l}"].shape[1:3] for l in range(2, 7)] == sizes + [(1, 1)]
  np.testing.assert_array_equal(out["p6"], out["p5"][:, ::2, ::2])


def test_norm_makes_the_convs_bias_free_and_keeps_the_default_tree():
  c = stages([(16, 24), (8, 12), (4, 6), (2, 3)], (256, 512, 1024, 2048))
  init = lambda m: jax.eval_shape(lambda: m.init(KEY, c))
  default, bn, gn = init(fpn.FPN()), init(fpn.FPN(norm="bn")), init(fpn.FPN(norm="gn"))
  assert sorted(default) == ["params"] and sorted(default["params"]["lateral_2"]) == [
    "bias",
    "kernel",
  ]
  # torchvision FeaturePyramidNetwork(..., norm_layer=BatchNorm2d) (maskrcnn_resnet50_fpn_v2).
  assert num_params(bn["params"]) == 3_346_432
  assert sorted(bn["params"]["lateral_2"]) == ["kernel"]
  assert sorted(bn["params"]["output_5_norm"]) == ["bias", "scale"]
  assert sorted(bn["batch_stats"]["lateral_3_norm"]) == ["mean", "var"]
  assert num_params(gn["params"]) == 3_346_432 and "batch_stats" not in gn
  with pytest.raises(ValueError, match="Unknown fpn.norm 'ln'"):
    init(fpn.FPN(norm="ln"))


def test_batch_norm_trains_on_batch_statistics():
  c = stages([(4, 4), (2, 2), (1, 1), (1, 1)], (2, 3, 4, 5), batch=2)
  model = fpn.FPN(out_channels=3, norm="bn")
  variables = model.init(KEY, c)
  (out, _), updates = model.apply(variables, c, train=True, mutable=["batch_stats"])
  # Initial running statistics are (0, 1): eval mode is the identity norm, train mode is not.
  p2 = np.asarray(out["p2"])
  np.testing.assert_allclose(p2.mean((0, 1, 2)), 0.0, atol=1e-5)
  assert not np.allclose(updates["batch_stats"]["output_2_norm"]["mean"], 0.0)
  eval_out, _ = model.apply(variables, c)
  assert not np.allclose(eval_out["p2"], p2)
