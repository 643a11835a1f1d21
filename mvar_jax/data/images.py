"""Robust image decoding to RGB and the ADM centre crop used by VAR/MVAR.

Real image folders hold grayscale, palette, RGBA, CMYK and 16-bit files, the odd truncated or
non-image file, and thumbnails too small to crop. Decoding goes through `open_rgb`, which
normalises every mode to 8-bit RGB and turns every decoder failure into `BadImage` naming the file,
so a pipeline can skip and count instead of crashing hours into an epoch.
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]

DEFAULT_MIN_SIZE = 8
# Alpha is composited over white: transparent pixels often hold arbitrary (usually black) colour.
_ALPHA_BACKGROUND = (255, 255, 255)
# Everything Pillow raises for unreadable, truncated or absurd files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, IndexError, EOFError,
                  Image.DecompressionBombError)


class BadImage(Exception):
  """A file that cannot be decoded to an image (corrupt, truncated, not an image)."""


class TinyImage(BadImage):
  """An image whose short side is below the `min_size` a pipeline accepts."""


def _name(src: Source, name: str | None) -> str:
  if name is not None:
    return name
  if isinstance(src, (bytes, bytearray, memoryview)):
    return f'<{len(src)} bytes>'
  return os.fspath(src)


def _open(src: Source, name: str) -> Image.Image:
  """Opens lazily (header only)."""
  try:
    if isinstance(src, (bytes, bytearray, memoryview)):
      return Image.open(io.BytesIO(bytes(src)))
    return Image.open(src)
  except _DECODE_ERRORS as e:
    raise BadImage(f'{name}: cannot identify image ({type(e).__name__}: {e})') from e


def probe(src: Source, *, name: str | None = None) -> tuple[tuple[int, int], str]:
  """((width, height), mode) from the header alone; cheap enough to run over a whole folder.

  Raises BadImage when the header cannot be read. A truncated body is only found by decoding.
  """
  name = _name(src, name)
  img = _open(src, name)
  try:
    return img.size, img.mode
  finally:
    img.close()


def open_rgb(src: Source, *, name: str | None = None,
             min_size: int = 0) -> tuple[Image.Image, bool]:
  """Decodes a file or bytes to an 8-bit RGB PIL image.

  Returns (image in mode 'RGB', converted) where converted says the stored mode was not RGB.
  Raises BadImage (corrupt / truncated / not an image) or TinyImage (short side < min_size).
  """
  name = _name(src, name)
  img = _open(src, name)
  try:
    # Opening reads the header only; load() decodes and is where truncation shows up.
    img.load()
    if min(img.size) < min_size:
      raise TinyImage(f'{name}: {img.size[0]}x{img.size[1]} is smaller than min_size={min_size}')
    mode = img.mode
    return _to_rgb(img), mode != 'RGB'
  except _DECODE_ERRORS as e:
    raise BadImage(f'{name}: cannot decode ({type(e).__name__}: {e})') from e


def load_rgb(src: Source, *, name: str | None = None, min_size: int = 0) -> np.ndarray:
  """Decodes a file or bytes to uint8 (H, W, 3). Raises BadImage / TinyImage like open_rgb."""
  img, _ = open_rgb(src, name=name, min_size=min_size)
  return np.asarray(img, dtype=np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
  mode = img.mode
  if mode == 'RGB':
    return img
  if mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
    # Pillow's convert('RGB') clips high-bit-depth values at 255, which whitens 16-bit images.
    return _scale_high_bit_depth(img)
  if mode == 'P' and 'transparency' in img.info:
    img, mode = img.convert('RGBA'), 'RGBA'
  if mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa'):
    rgba = img.convert('RGBA')
    canvas = Image.new('RGB', rgba.size, _ALPHA_BACKGROUND)
    canvas.paste(rgba, mask=rgba.getchannel('A'))
    return canvas
  # L, 1, P, CMYK (Pillow undoes Adobe's inverted CMYK when decoding), YCbCr, LAB, HSV.
  return img.convert('RGB')


def _scale_high_bit_depth(img: Image.Image) -> Image.Image:
  a = np.asarray(img).astype(np.float64)
  if img.mode == 'F':
    # Float images are usually in [0, 1]; anything larger is taken to be in [0, 255].
    a = a * 255.0 if a.size and a.max() <= 1.0 else a
  elif img.mode.startswith('I;16') or (a.size and a.max() > 255):
    # 'I' (32-bit) holds 16-bit PNGs in older Pillow; values above 255 mean a 16-bit range.
    a = a / 257.0
  gray = np.clip(np.round(a), 0, 255).astype(np.uint8)
  return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), 'RGB')


def center_crop_adm(image: Image.Image | np.ndarray, image_size: int) -> np.ndarray:
  """ADM centre crop: halve with a box filter while the short side >= 2 * image_size, resize
  bicubically so the short side == image_size, then crop the centre.

  image: PIL image or uint8 (H, W, 3). Returns uint8 (image_size, image_size, 3).
  """
  img = Image.fromarray(np.asarray(image, np.uint8)) if isinstance(image, np.ndarray) else image
  if img.mode != 'RGB':
    img = _to_rgb(img)
  # Repeated box halving before the final bicubic step avoids aliasing on large images.
  while min(img.size) >= 2 * image_size:
    img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
  scale = image_size / min(img.size)
  img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
  arr = np.asarray(img, dtype=np.uint8)
  top = (arr.shape[0] - image_size) // 2
  left = (arr.shape[1] - image_size) // 2
  return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


def random_hflip(image_HWC: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  """Mirrors left-right with probability p; image (H, W, C), rng a numpy Generator."""
  return image_HWC[:, ::-1] if rng.random() < p else image_HWC
