"""Token layout of a multi-scale token pyramid.

A pyramid with patch nums (1, 2, 3, ..., 16) is flattened scale after scale, each
scale in raster order, into one sequence of L = sum(pn**2) tokens (680 for 256 px).
Everything here is static Python (ints and tuples) so it can steer tracing.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

DEFAULT_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclasses.dataclass(frozen=True)
class ScaleLayout:
  """Offsets of every scale in the flattened sequence."""

  patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS

  def __post_init__(self):
    pns = tuple(int(p) for p in self.patch_nums)
    if not pns or any(p < 1 for p in pns):
      raise ValueError(f'patch_nums must be positive integers, got {self.patch_nums}')
    if any(b <= a for a, b in zip(pns, pns[1:])):
      raise ValueError(f'patch_nums must be strictly increasing, got {self.patch_nums}')
    object.__setattr__(self, 'patch_nums', pns)

  @property
  def num_scales(self) -> int:
    return len(self.patch_nums)

  @property
  def total_len(self) -> int:
    """L: tokens over all scales."""
    return sum(p * p for p in self.patch_nums)

  def scale_len(self, si: int) -> int:
    return self.patch_nums[si] ** 2

  def begin(self, si: int) -> int:
    return sum(p * p for p in self.patch_nums[:si])

  def end(self, si: int) -> int:
    return self.begin(si) + self.scale_len(si)

  def span(self, first: int, last: int) -> tuple[int, int]:
    """[begin, end) token range covering scales first..last (inclusive)."""
    return self.begin(first), self.end(last)

  def level_ids(self, first: int = 0, last: int | None = None) -> np.ndarray:
    """(L_seg,) int32 scale index of every token of scales first..last."""
    last = self.num_scales - 1 if last is None else last
    return np.concatenate([np.full(self.scale_len(s), s, np.int32) for s in range(first, last + 1)])

  def split(self, x, first: int, last: int, axis: int = 1) -> list:
    """Splits an array holding scales first..last along `axis` into one piece per scale."""
    sizes = [self.scale_len(s) for s in range(first, last + 1)]
    if x.shape[axis] != sum(sizes):
      raise ValueError(f'axis {axis} has {x.shape[axis]} tokens, scales {first}..{last} need {sum(sizes)}')
    cuts = np.cumsum(sizes)[:-1].tolist()
    return np.split(x, cuts, axis=axis) if isinstance(x, np.ndarray) else _jnp_split(x, cuts, axis)


def _jnp_split(x, cuts: Sequence[int], axis: int):
  import jax.numpy as jnp  # local import keeps this module numpy-only for data code
  return jnp.split(x, cuts, axis=axis)


def phi_index(si: int, num_scales: int, num_phi: int = 4) -> int:
  """Which shared Phi conv serves scale `si` (VAR's partially shared quant_resi).

  Ticks are linspace(1/(3K), 1-1/(3K), K) for K == 4, else linspace(1/(2K), 1-1/(2K), K);
  the nearest tick to si/(S-1) wins. Computed in float64: float32 picks the wrong Phi for si=7.
  """
  if num_phi == 1:
    return 0
  k = num_phi
  if k == 4:
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k, dtype=np.float64)
  else:
    ticks = np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k, dtype=np.float64)
  at = si / (num_scales - 1) if num_scales > 1 else 0.0
  return int(np.argmin(np.abs(ticks - at)))
