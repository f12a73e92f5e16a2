"""Splits of a listing: tfds's slicing syntax on sorted file lists (`all[:120]`, `all[80%:]`).

`parse_split("train[10:-5]")` -> ("train", slice); `select(items, slice)` takes the part.
Boundaries are example counts (negative from the end) or percentages, a percentage p of n
items being round(p * n / 100) as tfds's default "closest" rounding: `all[:80%]` and
`all[80%:]` are disjoint and together the whole listing.
"""

from __future__ import annotations

import dataclasses
import re

_SPLIT = re.compile(r"^(?P<name>[^\[\]]+)(\[(?P<start>[^:\]]*):(?P<stop>[^\]]*)\])?$")
_BOUNDARY = re.compile(r"^-?\d+%?$")


@dataclasses.dataclass(frozen=True)
class Split:
  """`name[start:stop]`: each bound None, an int (negative from the end) or "P%"."""

  name: str
  start: int | str | None = None
  stop: int | str | None = None

  def indices(self, n: int) -> range:
    """The [begin, end) range of a listing of `n` items that this split selects."""
    return range(n)[slice(_absolute(self.start, n), _absolute(self.stop, n))]


def parse_split(spec: str) -> Split:
  """`"all"`, `"train[:120]"`, `"all[80%:]"` -> Split; anything else is a ValueError naming it."""
  match = _SPLIT.match(spec.strip())
  bounds = [match.group(k) if match else None for k in ("start", "stop")]
  if not match or any(b and not _BOUNDARY.match(b.strip()) for b in bounds):
    raise ValueError(
      f"Split {spec!r} is not NAME or NAME[START:STOP] with START and STOP "
      "example counts or percentages, e.g. 'all[:80%]', 'train[100:]'."
    )
  start, stop = (
    None if not b or not b.strip() else b.strip() if b.strip().endswith("%") else int(b)
    for b in bounds
  )
  return Split(match.group("name").strip(), start, stop)


def _absolute(bound: int | str | None, n: int) -> int | None:
  if isinstance(bound, str):
    return int(round(int(bound[:-1]) * n / 100))
  return bound
