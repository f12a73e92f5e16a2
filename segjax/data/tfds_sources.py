"""Oxford-IIIT Pet (Parkhi et al. 2012) and Cityscapes (Cordts et al. 2016) from tfds.

Both sources follow the segjax source contract:

  fn(split, *, data_dir, process_index=0, process_count=1) -> tf.data.Dataset

yielding unbatched `{"image": uint8 (H, W, 3), "mask": uint8 (H, W)}` at the data set's
native size, mask values being class ids with 255 = ignore. The order is deterministic (files
are not shuffled; the pipeline shuffles) and the cardinality is known. Process
`process_index` of `process_count` reads `tfds.even_splits(split, process_count)`'s part of
the split, so that the parts cover the split exactly once; the first parts get the remainder.

Preparation. A data set not yet prepared in `data_dir` (None: tfds's default, `$TFDS_DATA_DIR` or
`~/tensorflow_datasets`) is prepared on first use when `process_count == 1`:
- Oxford-IIIT Pet is downloaded by tfds (about 800 MB).
- Cityscapes needs registration, so tfds reads the archives from the manual directory
  `<data_dir>/downloads/manual/`: `leftImg8bit_trainvaltest.zip` and
  `gtFine_trainvaltest.zip` from https://www.cityscapes-dataset.com/downloads/.
With several processes, prepare first with one (processes writing the same directory race).
"""

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

OXFORD_IIIT_PET_CLASS_NAMES = ("background", "pet", "border")

CITYSCAPES_CLASS_NAMES = (
  "road",
  "sidewalk",
  "building",
  "wall",
  "fence",
  "pole",
  "traffic light",
  "traffic sign",
  "vegetation",
  "terrain",
  "sky",
  "person",
  "rider",
  "car",
  "truck",
  "bus",
  "train",
  "motorcycle",
  "bicycle",
)

IGNORE_LABEL = 255

# Pets trimap value -> class: 1 = pet, 2 = background, 3 = border (the README of the
# annotations); anything else does not occur and is ignored.
_PET_TRIMAP_TO_CLASS = np.full(256, IGNORE_LABEL, np.uint8)
_PET_TRIMAP_TO_CLASS[[1, 2, 3]] = [1, 0, 2]

# Cityscapes labelId -> trainId, the `labels` table of cityscapesScripts
# (cityscapesscripts/helpers/labels.py). gtFine `*_labelIds.png` hold ids 0-33; 'license
# plate' has id -1 and never appears in them; every other byte value is ignored too.
CITYSCAPES_LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE_LABEL, np.uint8)
CITYSCAPES_LABEL_ID_TO_TRAIN_ID[
  [
    7,  # road
    8,  # sidewalk
    11,  # building
    12,  # wall
    13,  # fence
    17,  # pole
    19,  # traffic light
    20,  # traffic sign
    21,  # vegetation
    22,  # terrain
    23,  # sky
    24,  # person
    25,  # rider
    26,  # car
    27,  # truck
    28,  # bus
    31,  # train
    32,  # motorcycle
    33,  # bicycle
  ]
] = np.arange(19)
# Ignored (trainId 255): 0 unlabeled, 1 ego vehicle, 2 rectification border, 3 out of roi,
# 4 static, 5 dynamic, 6 ground, 9 parking, 10 rail track, 14 guard rail, 15 bridge,
# 16 tunnel, 18 polegroup, 29 caravan, 30 trailer.

CITYSCAPES_MANUAL_FILES = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")


def oxford_iiit_pet(
  split: str, *, data_dir: str | None, process_index: int = 0, process_count: int = 1
) -> tf.data.Dataset:
  """Oxford-IIIT Pet images with trimap classes 0 = background, 1 = pet, 2 = border.

  Splits: "train" (3,680 images), "test" (3,669), and tfds sub-splits such as "train[:90%]".
  """
  builder = tfds.builder("oxford_iiit_pet", data_dir=data_dir)
  _prepare(builder, process_count)
  table = tf.constant(_PET_TRIMAP_TO_CLASS)

  def to_features(example):
    return {
      "image": example["image"],
      "mask": tf.gather(table, tf.cast(example["segmentation_mask"][..., 0], tf.int32)),
    }

  return _read(builder, split, process_index, process_count).map(
    to_features, num_parallel_calls=tf.data.AUTOTUNE
  )


def cityscapes(
  split: str, *, data_dir: str | None, process_index: int = 0, process_count: int = 1
) -> tf.data.Dataset:
  """Cityscapes fine annotations, 1024x2048, labelIds mapped to the 19 train classes.

  Splits: "train" (2,975 images), "validation" (500), "test" (1,525; its public labels are
  placeholders, nearly all 'unlabeled', so its masks are ignore). The archives must be in
  `<data_dir>/downloads/manual/` (see the module docstring).
  """
  builder = tfds.builder("cityscapes/semantic_segmentation", data_dir=data_dir)
  if not builder.is_prepared():
    manual_dir = builder.data_dir_root / "downloads" / "manual"
    missing = [f for f in CITYSCAPES_MANUAL_FILES if not (manual_dir / f).exists()]
    if missing:
      raise FileNotFoundError(
        f"cityscapes is not prepared in {builder.data_dir_root} and {', '.join(missing)} "
        f"is missing from the manual directory {manual_dir}: register at "
        "https://www.cityscapes-dataset.com/downloads/ and put "
        f"{' and '.join(CITYSCAPES_MANUAL_FILES)} there."
      )
  _prepare(builder, process_count)
  table = tf.constant(CITYSCAPES_LABEL_ID_TO_TRAIN_ID)

  def to_features(example):
    return {
      "image": example["image_left"],
      "mask": tf.gather(table, tf.cast(example["segmentation_label"][..., 0], tf.int32)),
    }

  return _read(builder, split, process_index, process_count).map(
    to_features, num_parallel_calls=tf.data.AUTOTUNE
  )


def _prepare(builder: tfds.core.DatasetBuilder, process_count: int) -> None:
  if builder.is_prepared():
    return
  if process_count > 1:
    raise RuntimeError(
      f"{builder.name} is not prepared in {builder.data_dir_root}; prepare it with a single "
      "process first (e.g. `tfds build` or one run of this source), since several processes "
      "would write the same files."
    )
  builder.download_and_prepare()


def _read(
  builder: tfds.core.DatasetBuilder, split: str, process_index: int, process_count: int
) -> tf.data.Dataset:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  part = tfds.even_splits(split, n=process_count)[process_index]
  # No file shuffling and no autocache: the pipeline owns shuffling and caching. tfds asserts
  # the cardinality of the part, which the evaluator pads by.
  read_config = tfds.ReadConfig(try_autocache=False)
  return builder.as_dataset(split=part, shuffle_files=False, read_config=read_config)
