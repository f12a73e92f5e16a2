"""Tests for segjax/models/resnet.py: shapes, torchvision parameter counts, norms, freezing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.layers import norms
from segjax.models import resnet

KEY = jax.random.key(0, impl="rbg")  # rbg keys compile much faster on CPU than threefry


def num_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def init_shapes(model, shape=(1, 64, 64, 3)):
  x = jnp.zeros(shape)

  def init_and_apply():
    variables = model.init(KEY, x, train=False)
    return variables, model.apply(variables, x, train=False)

  return jax.eval_shape(init_and_apply)


# torchvision resnet{18,34,50,101} minus the final fc (weights 512|2048 x 1000 + 1000 biases),
# with ordinary BatchNorm whose scale and bias are parameters.
TORCHVISION_NO_FC = {
  18: 11_689_512 - 513_000,
  34: 21_797_672 - 513_000,
  50: 25_557_032 - 2_049_000,
  101: 44_549_160 - 2_049_000,
}


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_parameter_count_matches_torchvision(depth):
  variables, _ = init_shapes(resnet.ResNet(depth=depth, norm="bn"))
  assert num_params(variables["params"]) == TORCHVISION_NO_FC[depth]
  assert TORCHVISION_NO_FC[50] == 23_508_032


def test_frozen_bn_vectors_are_not_parameters():
  # torchvision's detection ResNet-50 uses FrozenBatchNorm2d: 26,560 channels of buffers.
  variables, _ = init_shapes(resnet.ResNet(depth=50, norm="frozen_bn"))
  assert num_params(variables["params"]) == 23_508_032 - 2 * 26_560
  assert num_params(variables["batch_stats"]) == 4 * 26_560
  gn, _ = init_shapes(resnet.ResNet(depth=50, norm="gn"))
  assert num_params(gn["params"]) == 23_508_032 and "batch_stats" not in gn


@pytest.mark.parametrize(
  "depth,channels", [(18, (64, 128, 256, 512)), (50, (256, 512, 1024, 2048))]
)
def test_stage_shapes(depth, channels):
  _, (out, aux) = init_shapes(resnet.ResNet(depth=depth), (2, 64, 96, 3))
  assert {k: v.shape for k, v in out.items()} == {
    f"c{l}": (2, 64 // 2**l, 96 // 2**l, c) for l, c in zip(range(2, 6), channels)
  }
  assert aux["stem"].shape == (2, 16, 24, 64) and aux["c1"].shape == (2, 32, 48, 64)
  assert all(v.dtype == jnp.float32 for v in out.values())


def test_odd_sizes_round_up_and_toy_width():
  _, (out, _) = init_shapes(resnet.ResNet(depth=18, base_width=8), (1, 65, 47, 3))
  assert [v.shape for v in out.values()] == [
    (1, 17, 12, 8),
    (1, 9, 6, 16),
    (1, 5, 3, 32),
    (1, 3, 2, 64),
  ]


def test_bfloat16_computation_keeps_float32_params():
  variables, (out, _) = init_shapes(resnet.ResNet(depth=18, base_width=8, dtype=jnp.bfloat16))
  assert out["c5"].dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_frozen_batch_norm_formula():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  stats = {
    k: rng.uniform(0.5, 2.0, size=(4,)).astype(np.float32) for k in ("scale", "bias", "mean", "var")
  }
  y = norms.FrozenBatchNorm().apply({"batch_stats": stats}, x)
  expected = (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * stats["scale"] + stats["bias"]
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_freeze_at_stops_gradients_and_statistics():
  model = resnet.ResNet(depth=18, base_width=4, norm="bn", freeze_at=2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)

  @jax.jit  # init inside: one compile instead of two
  def init_grads_and_stats():
    variables = model.init(KEY, x, train=False)

    def loss(p):
      (out, _), upd = model.apply(
        {"params": p, "batch_stats": variables["batch_stats"]},
        x,
        train=True,
        mutable=["batch_stats"],
      )
      return sum(jnp.sum(v**2) for v in out.values()), upd

    return variables["batch_stats"], *jax.grad(loss, has_aux=True)(variables["params"])

  old, grads, updates = init_grads_and_stats()
  norm = lambda t: sum(float(jnp.sum(jnp.abs(v))) for v in jax.tree.leaves(t))
  assert norm(grads["stem_conv"]) == 0 and norm(grads["res2_1"]) == 0
  assert norm(grads["res3_0"]) > 0 and norm(grads["res5_1"]) > 0
  new = updates["batch_stats"]
  np.testing.assert_array_equal(new["stem_norm"]["mean"], old["stem_norm"]["mean"])
  np.testing.assert_array_equal(new["res2_0"]["norm1"]["mean"], old["res2_0"]["norm1"]["mean"])
  assert not np.array_equal(new["res3_0"]["norm1"]["mean"], old["res3_0"]["norm1"]["mean"])


def test_errors_name_the_choices():
  with pytest.raises(ValueError, match="depth 42"):
    init_shapes(resnet.ResNet(depth=42))
  with pytest.raises(ValueError, match="norm 'sync'"):
    init_shapes(resnet.ResNet(depth=18, norm="sync"))
