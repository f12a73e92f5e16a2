"""Segmentation models, selected by name from a config through one explicit dict."""

import dataclasses
from typing import Any

import jax.numpy as jnp

from segjax.models.unet import UNet

MODELS = {"unet": UNet}


def create_model(model_config: Any):
  """Builds the model named `model_config.name` from the other keys of `model_config`.

  Args:
    model_config: an ml_collections ConfigDict (or any mapping) with `name` and the module's
      attributes, e.g. for "unet": num_classes, depth, base_width, norm, dropout_rate,
      upsampling and optionally dtype (a string such as "bfloat16"). Keys left out take the
      module's defaults.

  Raises:
    ValueError: for an unknown model name or a key the model does not have.
  """
  kwargs = dict(model_config.items())
  name = kwargs.pop("name", None)
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; known models: {sorted(MODELS)}.")
  cls = MODELS[name]
  fields = {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(
        f"Model {name!r} has no attribute(s) {unknown}; accepted keys: {sorted(fields)}.")
  if isinstance(kwargs.get("dtype"), str):
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  return cls(**kwargs)


__all__ = ["MODELS", "UNet", "create_model"]
