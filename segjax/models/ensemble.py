"""Deep ensembles (Lakshminarayanan, Pritzel and Blundell, 2017, arXiv:1612.01474): E copies
of a semantic model with independent parameters, trained together in one jitted step.

`Ensemble(member, size)` is an ordinary linen module built with `nn.vmap` over the member: its
variables are the member's tree with a leading axis of `size` (member i's parameters are
`tree[i]`, initialized from `jax.random.split(rng, size)[i]`), and it maps images (B, H, W, C)
shared by every member to stacked logits (E, B, H, W, K) and stacked aux features.

Vmapped convolutions with per-member kernels become grouped convolutions, which XLA:CPU runs
about 20x slower than the members' convolutions one by one (benchmarks/ensemble_step.py:
1630 ms against 58 ms for 3 single steps of a small U-Net). So on CPU the members run one
after the other inside the same step (`vectorized=False`: an unrolled `nn.scan`; still
initialized by `nn.vmap`): the same variables and the same results up to float summation
order. The train
state, optimizer, checkpoints and the jit/pmap steps see one parameter tree and need nothing
else; `segjax.train.semantic` reads the member axis of the logits: the loss is the sum of the
members' losses (so each member's gradient is its own loss's), predictions are the mean of
the members' softmax, and evaluation reports the ensemble and each member.

Optimizers act per element (adamw, sgd, weight decay), so each member trains exactly as it
would alone; global-norm gradient clipping would couple them, so ensembles clip each member's
gradient norm on its own (`clip_by_member_norm`). Dropout masks differ between members (the
"dropout" rng is split too).
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import optax

from segjax.errors import ConfigError


class Ensemble(nn.Module):
  """`size` copies of `member` on the same images; logits (E, B, H, W, K).

  Attributes:
    member: the model copied: its attributes, not its variables (each copy has its own).
    size: E, the number of members.
    vectorized: True: the members batched by `nn.vmap`; False: one after the other (an
      unrolled `nn.scan`), faster on CPU (module docstring). Same variables either way.
    split_batch: in training, each member sees its own `B / E` examples of the batch (member
      i the i-th consecutive slice; logits (E, B / E, H, W, K)), as if E models were trained
      on E independent batches; in evaluation every member sees every example.
  """

  task: ClassVar[str] = "semantic"

  member: nn.Module
  size: int
  vectorized: bool = True
  split_batch: bool = False

  @property
  def stride(self) -> int:
    return self.member.stride

  def setup(self):
    # The members' variables sit where a lone member's would, with a leading axis.
    nn.share_scope(self, self.member)

  def splits(self, train: bool) -> bool:
    """Whether the members see separate slices of the batch (`split_batch`, in training)."""
    return self.split_batch and train

  def member_slices(self, x: jax.Array) -> jax.Array:
    """(B, ...) -> (E, B / E, ...): member i's examples at index i."""
    if x.shape[0] % self.size:
      raise ConfigError(
        f"Ensemble split_batch: a batch of {x.shape[0]} examples (per device under pmap) "
        f"does not divide among {self.size} members."
      )
    return x.reshape(self.size, x.shape[0] // self.size, *x.shape[1:])

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict]:
    """Images (B, H, W, C) -> (logits (E, B, H, W, K), aux with (E, ...) features); with
    `split_batch` in training, logits (E, B / E, H, W, K) of each member's own slice."""
    split = self.splits(train) and not self.is_initializing()
    if split:
      x = self.member_slices(x)
    axes = dict(
      variable_axes={"params": 0, "batch_stats": 0, "intermediates": 0},
      split_rngs={"params": True, "dropout": True},
    )
    # Initialized by nn.vmap either way: nn.scan would derive other members' rngs.
    if self.vectorized or self.is_initializing():
      # nn.vmap passes no keyword arguments: `train` is closed over.
      members = nn.vmap(
        lambda member, x: member(x, train=train),
        in_axes=0 if split else None,
        out_axes=0,
        axis_size=self.size,
        **axes,
      )
      return members(self.member, x)
    members = nn.scan(
      lambda member, carry, x: (carry, member(x, train=train)),
      in_axes=0 if split else nn.broadcast,
      out_axes=0,
      length=self.size,
      unroll=self.size,
      **axes,
    )
    return members(self.member, None, x)[1]


def of(
  member: nn.Module, size, vectorized: bool | None = None, split_batch: bool = False
) -> nn.Module:
  """`config.ensemble_size` copies of `member`: the member itself for 1 (training exactly
  as without the key), else an `Ensemble`, vectorized unless the default backend is the CPU
  (or as `vectorized` says), each member on its own slice of a training batch with
  `split_batch` (`config.ensemble_split_batch`). Raises `ConfigError` for a size that is not
  a positive integer, or for a member that is not a semantic model."""
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise ConfigError(f"ensemble_size={size!r} must be a positive integer.")
  if size == 1:
    return member
  task = getattr(type(member), "task", None)
  if task != "semantic":
    raise ConfigError(
      f"ensemble_size={size}: ensembles are of semantic models; "
      f"{type(member).__name__} is a {task!r} model."
    )
  if vectorized is None:
    vectorized = jax.default_backend() != "cpu"
  return Ensemble(member, size, vectorized, split_batch)


def clip_by_member_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` applied to each member on its own, by `vmap` over the
  leading member axis of the gradients: a member's gradients are scaled down only when their
  own global norm exceeds `max_norm`. The state is empty, as `clip_by_global_norm`'s, so
  checkpoints have one structure either way."""
  clip = optax.clip_by_global_norm(max_norm)

  def update(updates, state, params=None):
    del params
    return jax.vmap(lambda u: clip.update(u, optax.EmptyState())[0])(updates), state

  return optax.GradientTransformation(clip.init, update)
