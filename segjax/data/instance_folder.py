"""Instance-mask folders as an instance source: `dataset.name = "instance_folder"`.

Images and PNG masks of instance ids (0 = background), laid out as `segjax.data.folder`
(`dataset.images_dir`, `masks_dir`, `mask_pattern`; split names or slices such as
`all[:120]`), each instance's class as `segjax.data.to_coco` reads it (one class by default;
`dataset.classes_dir` or `dataset.classes_file`; `dataset.class_names`). The split is converted
to a COCO instances JSON (`annotation_file`), kept in a cache directory under a name that
depends on the files' paths, sizes and modification times and on the keys, so a changed file
is converted again; `segjax.data.coco` then reads it, and evaluation scores against the same
JSON. So everything the COCO source does (overflow policies, resizing, shuffled file names
before decoding, errors naming files) holds here too.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import ml_collections

from segjax.data import coco, to_coco
from segjax.data.folder import list_pairs

LAYOUT_KEYS = ("images_dir", "masks_dir", "mask_pattern")
DEFAULTS = dict(
  images_dir="{split}/images",
  masks_dir="{split}/masks",
  mask_pattern="{stem}.png",
  classes_dir=None,
  classes_file=None,
  class_names=to_coco.DEFAULT_CLASS_NAMES,
)


def cache_dir() -> str:
  return os.environ.get("SEGJAX_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "segjax_cache")


def conversion_kwargs(dataset: ml_collections.ConfigDict) -> dict:
  """The keys of `to_coco.instance_folder_to_coco` that `dataset` sets."""
  return {k: dataset[k] for k in DEFAULTS if dataset.get(k) is not None}


def annotation_file(data_dir: str, split: str, **kwargs) -> str:
  """The COCO JSON of `split` (converted now, or earlier with the same files and keys)."""
  kwargs = {**DEFAULTS, **{k: v for k, v in kwargs.items() if v is not None}}
  kwargs["class_names"] = tuple(kwargs["class_names"])
  layout = {k: kwargs[k] for k in LAYOUT_KEYS}
  image_paths, mask_paths = list_pairs(split, data_dir, **layout)
  key = hashlib.sha256(
    json.dumps([os.path.abspath(data_dir), split, sorted(kwargs.items())], default=str).encode()
  )
  for path in image_paths + mask_paths + [kwargs.get("classes_file") or ""]:
    if path:
      stat = os.stat(path)
      key.update(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
  path = os.path.join(cache_dir(), f"instances_{key.hexdigest()[:20]}.json")
  if not os.path.isfile(path):
    data = to_coco.instance_folder_to_coco(data_dir, split, **kwargs)
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(data, f)
    os.replace(tmp, path)  # Atomic: processes converting at once write the same file.
  return path


def instance_folder(split: str, *, data_dir: str | None, **kwargs):
  """`segjax.data.coco.coco_instances` of the split's converted JSON: `kwargs` holds the
  conversion keys (`DEFAULTS`' names) and `coco_instances`' own."""
  if data_dir is None:
    raise ValueError(
      "instance_folder needs dataset.data_dir: the folder holding the images and masks."
    )
  conversion = {k: kwargs.pop(k) for k in DEFAULTS if k in kwargs}
  path = annotation_file(data_dir, split, **conversion)
  return coco.coco_instances(
    split, data_dir=data_dir, annotation_file=path, image_dir=data_dir, **kwargs
  )
