"""Batched, jit-able JAX equivalents of the seed's torchvision training augmentations.

The seed trains on

    RandomCrop(32, padding=4), RandomHorizontalFlip(),
    ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1),
    RandomRotation(15), RandomAffine(degrees=0, translate=(0.1, 0.1)),
    ToTensor(), Normalize(0.5, 0.5)

applied to one PIL image at a time. This module does the same to a whole batch inside a
jitted function, from one JAX key, with no Python loop over the batch.

Layout and values: images are NHWC arrays. The colour ops take float32 in [0, 1] (what
ToTensor gives); the geometric ops (crop, hflip, translate, rotate) only move pixels and
take any dtype. Normalization, (x - 0.5) / 0.5, is not done here (see
`input_pipeline.normalize`).

Three layers:

* Functional ops with explicit per-image parameters (`crop`, `hflip`, `translate`,
  `rotate`, `rotate_translate`, `adjust_brightness`, `adjust_contrast`,
  `adjust_saturation`, `adjust_hue`, `color_jitter`). Each reproduces torchvision's
  *tensor* implementation (`torchvision.transforms._functional_tensor`) on float images:
  the pixel moves are exact, the colour ops agree to float32 rounding.
* Samplers drawing those parameters with torchvision's distributions (`sample_crop`,
  `sample_hflip`, `sample_color_jitter`, `sample_rotation`, `sample_translate`) and the
  random ops built from them (`random_crop`, ..., `random_translate`).
* `augment(key, images_uint8, policy)`: the policy registry (`POLICIES`: each policy's
  stages here and its torchvision transforms for the host path) the input pipeline calls.

Difference from the seed: the seed runs these transforms on PIL uint8 images, so PIL
rounds to 0..255 after every op, computes hue on a 0..255 HSV grid and breaks near-ties of
nearest rotation its own way. The ops here follow torchvision's float tensor path, which
keeps full precision between ops. Measured against the PIL path on the same parameters
(in 8-bit levels; tests/test_augment.py bounds each): brightness, contrast and saturation
differ by about a level; hue differs most, on saturated bright pixels, because PIL quantizes H, S and V to 0..255 and
truncates hue_factor * 255 to an integer; rotation takes another source pixel on a few
pixels in ten thousand; tests/test_augment.py holds the bounds of the whole seed chain.
"""

import dataclasses
import functools
import itertools
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxres.registry import Registry

Array = jax.Array
Range = Union[float, Sequence[float]]

# ToTensor divides uint8 images by this.
UINT8_MAX = 255
# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# ColorJitter.get_params' op ids: `orders` rows are permutations of these.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
NUM_JITTER_OPS = 4
# adjust_hue accepts hue factors in [-MAX_HUE, MAX_HUE] (a factor is a fraction of a turn).
MAX_HUE = 0.5
# HSV hue is split into six sectors of 60 degrees.
HUE_SECTORS = 6
# The seed's parameters.
SEED_CROP_PADDING = 4
SEED_JITTER = dict(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)
SEED_ROTATION_DEGREES = 15.0
SEED_TRANSLATE_FRACTION = 0.1
HFLIP_PROBABILITY = 0.5
# The airbench speed runs translate by up to 2 pixels, reflecting the border.
SPEEDRUN_TRANSLATE = 2


def _per_image(values: Array, images: Array) -> Array:
  """(B,) per-image values shaped to broadcast against (B, H, W, C) images."""
  return jnp.reshape(values, (-1,) + (1,) * (images.ndim - 1))


# x / 255 for every uint8 value, correctly rounded. XLA compiles a division by a constant
# as a multiplication by its reciprocal, which differs from ToTensor's division by one ulp
# for half the values; a table lookup is exact and as fast.
_UINT8_TO_FLOAT = np.arange(UINT8_MAX + 1, dtype=np.float32) / np.float32(UINT8_MAX)


def to_float(images_uint8: Array) -> Array:
  """torchvision's ToTensor on uint8 images, bit for bit: float32 x / 255 in [0, 1]."""
  return jnp.asarray(_UINT8_TO_FLOAT)[images_uint8.astype(jnp.int32)]


# ---------------------------------------------------------------------------- pixel moves

def _shift(images: Array, dy: Array, dx: Array, max_shift: tuple[int, int],
           mode: str = 'constant') -> Array:
  """out[b, y, x] = images[b, y - dy[b], x - dx[b]], zero where that is outside.

  Pads by the static `max_shift` (rows, cols) -- zeros, or mode='reflect' mirrors the
  border -- and slices each image at its own offset (a dynamic_slice under vmap); shifts
  must lie in [-max_shift, max_shift].
  """
  pad_y, pad_x = max_shift
  height, width = images.shape[1:3]
  padded = jnp.pad(images, ((0, 0), (pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode=mode)

  def one(image, top, left):
    return jax.lax.dynamic_slice(image, (top, left, 0), (height, width, image.shape[-1]))

  return jax.vmap(one)(padded, pad_y - jnp.asarray(dy, jnp.int32),
                       pad_x - jnp.asarray(dx, jnp.int32))


def crop(images: Array, tops: Array, lefts: Array, padding: int,
         padding_mode: str = 'constant') -> Array:
  """RandomCrop(size=(H, W), padding) with given offsets: F.crop(F.pad(img, padding), ...).

  Each image is padded by `padding` on every side (zeros, or padding_mode='reflect' as
  RandomCrop's padding_mode='reflect') and the H x W window whose top-left corner is
  (tops[b], lefts[b]) in the padded image is kept; offsets lie in [0, 2 * padding].
  """
  return _shift(images, padding - jnp.asarray(tops), padding - jnp.asarray(lefts),
                (padding, padding), padding_mode)


def hflip(images: Array, flags: Array) -> Array:
  """F.hflip (mirror left-right) on the images whose flag is true."""
  return jnp.where(_per_image(flags, images), images[:, :, ::-1], images)


def alternating_hflip(images: Array, flip_bits: Array, epoch) -> Array:
  """Alternating flips: image i is mirrored in epoch e iff flip_bits[i] xor (e odd).

  Each image is seen mirrored in every other epoch, starting from a random choice, which
  gives more diverse pairs of epochs than independent random flips (the airbench runs).
  """
  return hflip(images, jnp.logical_xor(flip_bits.astype(bool), epoch % 2 == 1))


def translate(images: Array, dx: Array, dy: Array, max_shift: Optional[int] = None) -> Array:
  """F.affine(img, angle=0, translate=(dx, dy), scale=1, shear=0, NEAREST, fill=0).

  Integer translations: the content moves dx pixels right and dy pixels down, and
  uncovered pixels are zero. torchvision samples the source at (x - dx, y - dy) with
  nearest interpolation, which is exact for integer shifts. `max_shift` (static) is the
  zero padding, so |dx| and |dy| must not exceed it; by default the image size, which
  covers every shift (larger ones blank the image, as they should).
  """
  bound = images.shape[1:3] if max_shift is None else (max_shift, max_shift)
  return _shift(images, dy, dx, bound)


def _rotation_matrices(angles_deg: Array, height: int, width: int) -> Array:
  """torchvision's rotation `theta` rescaled as in _gen_affine_grid, (B, 2, 2).

  F.rotate(img, angle) builds the inverse affine matrix for -angle about the centre,
  theta = [[cos a, -sin a, 0], [sin a, cos a, 0]], and divides its rows by (W/2, H/2)
  to map output pixel centres (relative to the image centre) to normalized
  grid_sample coordinates.
  """
  radians = jnp.deg2rad(jnp.asarray(angles_deg, jnp.float32))
  cos, sin = jnp.cos(radians), jnp.sin(radians)
  theta = jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)
  return theta / jnp.array([0.5 * width, 0.5 * height], jnp.float32)[:, None]


def _nearest_index(grid: Array, size: int) -> tuple[Array, Array]:
  """grid_sample(mode='nearest', align_corners=False) along one axis of `size` pixels.

  Un-normalizes [-1, 1] to pixel coordinates, (g + 1) * size / 2 - 1/2, rounds half to
  even (nearbyint) and reports whether the pixel is inside (padding_mode='zeros').
  """
  coordinate = (grid + 1.0) * jnp.float32(0.5 * size) - 0.5
  index = jnp.round(coordinate).astype(jnp.int32)
  return index, (index >= 0) & (index < size)


def _centred(index: Array, size: int) -> Array:
  """Pixel centres relative to the image centre, index - (size/2 - 1/2): the values of
  _gen_affine_grid's base grid, linspace(-size/2 + 1/2, size/2 - 1/2, size), exactly."""
  return index.astype(jnp.float32) - jnp.float32(0.5 * size - 0.5)


def rotate_translate(images: Array, angles_deg: Array, dx: Optional[Array] = None,
                     dy: Optional[Array] = None) -> Array:
  """translate(rotate(images, angles_deg), dx, dy) in one gather.

  Output pixel (y, x) takes the rotated image's pixel (y - dy, x - dx) when that is
  inside the image, so both ops' source coordinates come from the same formula torchvision
  evaluates and both zero fills are kept.
  """
  batch, height, width = images.shape[:3]
  zeros = jnp.zeros((batch,), jnp.int32)
  dx = zeros if dx is None else jnp.asarray(dx, jnp.int32)
  dy = zeros if dy is None else jnp.asarray(dy, jnp.int32)
  rows = jnp.arange(height)[None, :] - dy[:, None]              # (B, H) rotated-image rows
  cols = jnp.arange(width)[None, :] - dx[:, None]               # (B, W)
  inside = (((rows >= 0) & (rows < height))[:, :, None]
            & ((cols >= 0) & (cols < width))[:, None, :])       # (B, H, W)
  y = _centred(rows, height)[:, :, None]
  x = _centred(cols, width)[:, None, :]
  m = _rotation_matrices(angles_deg, height, width)[:, :, :, None, None]
  grid_x = x * m[:, 0, 0] + y * m[:, 0, 1]
  grid_y = x * m[:, 1, 0] + y * m[:, 1, 1]
  src_x, inside_x = _nearest_index(grid_x, width)
  src_y, inside_y = _nearest_index(grid_y, height)
  valid = inside & inside_x & inside_y
  # Gather from the flattened images with one appended zero pixel for outside sources.
  channels = images.shape[-1]
  flat = jnp.concatenate([images.reshape(batch, height * width, channels),
                          jnp.zeros((batch, 1, channels), images.dtype)], axis=1)
  index = jnp.where(valid, src_y * width + src_x, height * width).reshape(batch, -1)
  out = jnp.take_along_axis(flat, index[:, :, None], axis=1)
  return out.reshape(images.shape)


def rotate(images: Array, angles_deg: Array) -> Array:
  """F.rotate(img, angle) on tensors: nearest, zero fill, about the image centre.

  Angles are in degrees, counter-clockwise. Reproduces torchvision's affine grid
  (_gen_affine_grid) and grid_sample(mode='nearest', padding_mode='zeros',
  align_corners=False).
  """
  return rotate_translate(images, angles_deg)


# ---------------------------------------------------------------------------- colour
#
# The colour ops compute on channel planes, (3, B, H, W) arrays, and take and return NHWC.
# XLA's CPU backend vectorizes the per-pixel arithmetic over contiguous planes but not over
# interleaved channels.


def _to_planes(images: Array) -> Array:
  """NHWC -> (C, B, H, W)."""
  return jnp.moveaxis(images, -1, 0)


def _from_planes(planes: Array) -> Array:
  """(C, B, H, W) -> NHWC."""
  return jnp.moveaxis(planes, 0, -1)


def _per_plane_pixel(values: Array) -> Array:
  """(B,) per-image values shaped to broadcast against (B, H, W) planes."""
  return jnp.reshape(jnp.asarray(values, jnp.float32), (-1, 1, 1))


def _blend(planes: Array, reference: Array, factors: Array) -> Array:
  """torchvision's _blend: clamp(f * img + (1 - f) * reference, 0, 1)."""
  f = _per_plane_pixel(factors)
  return jnp.clip(f * planes + (1.0 - f) * reference, 0.0, 1.0)


def _grayscale(planes: Array) -> Array:
  """rgb_to_grayscale: 0.2989 R + 0.587 G + 0.114 B, shape (B, H, W)."""
  r, g, b = planes
  wr, wg, wb = GRAY_WEIGHTS
  return wr * r + wg * g + wb * b


def _mean(gray: Array) -> Array:
  """Each image's mean value (adjust_contrast's reference), shape (B, 1, 1)."""
  return jnp.mean(gray.reshape(gray.shape[0], -1), axis=-1)[:, None, None]


def _brightness(planes: Array, factors: Array) -> Array:
  return _blend(planes, 0.0, factors)


def _contrast(planes: Array, factors: Array) -> Array:
  return _blend(planes, _mean(_grayscale(planes)), factors)


def _saturation(planes: Array, factors: Array) -> Array:
  return _blend(planes, _grayscale(planes), factors)


def _fraction(x: Array) -> Array:
  """x mod 1 for x > -1, bit for bit as torch.fmod(x, 1) (x >= 0) and x % 1.0.

  For x >= 0, x - floor(x) is exact; for -1 < x < 0 both compute x + 1 rounded. (XLA's
  CPU backend calls libm per element for fmod/rem, which is several times slower.)
  """
  return x - jnp.floor(x)


def _rgb_to_hsv(planes: Array) -> Array:
  """torchvision's _rgb2hsv (Pillow's algorithm), operation for operation: (h, s, v)."""
  r, g, b = planes
  maxc = jnp.maximum(jnp.maximum(r, g), b)  # (a reduction over the planes is slower)
  minc = jnp.minimum(jnp.minimum(r, g), b)
  eqc = maxc == minc
  cr = maxc - minc
  ones = jnp.ones_like(maxc)
  s = cr / jnp.where(eqc, ones, maxc)
  cr_divisor = jnp.where(eqc, ones, cr)
  rc = (maxc - r) / cr_divisor
  gc = (maxc - g) / cr_divisor
  bc = (maxc - b) / cr_divisor
  hr = jnp.where(maxc == r, bc - gc, 0.0)
  hg = jnp.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
  hb = jnp.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
  h = _fraction((hr + hg + hb) / HUE_SECTORS + 1.0)
  return jnp.stack([h, s, maxc])


# For each hue sector, which of (v, q, p, t) becomes R, G and B (torchvision's _hsv2rgb).
_V, _Q, _P, _T = range(4)
_SECTOR_TO_RGB = ((_V, _T, _P), (_Q, _V, _P), (_P, _V, _T),
                  (_P, _Q, _V), (_T, _P, _V), (_V, _P, _Q))


def _hsv_to_rgb(hsv: Array) -> Array:
  """torchvision's _hsv2rgb, operation for operation."""
  h, s, v = hsv
  sector = jnp.floor(h * HUE_SECTORS)
  f = h * HUE_SECTORS - sector
  sector = sector.astype(jnp.int32) % HUE_SECTORS
  p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
  q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
  t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
  candidates = (v, q, p, t)
  return jnp.stack([
      jax.lax.select_n(sector, *(candidates[rgb[channel]] for rgb in _SECTOR_TO_RGB))
      for channel in range(3)])


def _hue(planes: Array, hue_factors: Array) -> Array:
  h, s, v = _rgb_to_hsv(planes)
  h = _fraction(h + _per_plane_pixel(hue_factors))
  return _hsv_to_rgb(jnp.stack([h, s, v]))


def _blend_op(planes: Array, ops: Array, factors: Array) -> Array:
  """Brightness, contrast or saturation per image (ops[b] in {0, 1, 2}) as one _blend.

  The three are _blend with different references (black, mean gray, gray), so one blend
  with a per-image reference is exactly each image's op.
  """
  gray = _grayscale(planes)
  ops = ops[:, None, None]
  reference = jnp.where(ops == BRIGHTNESS, 0.0, jnp.where(ops == CONTRAST, _mean(gray), gray))
  return _blend(planes, reference, factors)


def _color_jitter(planes: Array, brightness: Array, contrast: Array, saturation: Array,
                  hue: Optional[Array], orders: Array) -> Array:
  orders = jnp.asarray(orders, jnp.int32)
  blend_factors = jnp.stack([brightness, contrast, saturation], axis=-1).astype(jnp.float32)
  hue_position = jnp.argmax(orders == HUE, axis=-1)

  def step(x, position, active):
    ops = jax.lax.dynamic_index_in_dim(orders, position, axis=1, keepdims=False)
    factors = jnp.take_along_axis(blend_factors, jnp.minimum(ops, SATURATION)[:, None], -1)
    return jnp.where(active[:, None, None], _blend_op(x, ops, factors[:, 0]), x)

  planes = jax.lax.fori_loop(0, NUM_JITTER_OPS - 1,
                             lambda position, x: step(x, position, position < hue_position),
                             planes)
  if hue is not None:
    planes = _hue(planes, hue)
  return jax.lax.fori_loop(1, NUM_JITTER_OPS,
                           lambda position, x: step(x, position, position > hue_position),
                           planes)


def adjust_brightness(images: Array, factors: Array) -> Array:
  """F.adjust_brightness(img, factors[b]) on each image: blend with black."""
  return _from_planes(_brightness(_to_planes(images), factors))


def adjust_contrast(images: Array, factors: Array) -> Array:
  """F.adjust_contrast(img, factors[b]): blend with the image's mean grayscale value."""
  return _from_planes(_contrast(_to_planes(images), factors))


def adjust_saturation(images: Array, factors: Array) -> Array:
  """F.adjust_saturation(img, factors[b]): blend with the grayscale image."""
  return _from_planes(_saturation(_to_planes(images), factors))


def adjust_hue(images: Array, hue_factors: Array) -> Array:
  """F.adjust_hue(img, hue_factors[b]): HSV hue rotated by a fraction of a turn.

  Factors must lie in [-0.5, 0.5] (torchvision raises otherwise; not checked under jit).
  """
  return _from_planes(_hue(_to_planes(images), hue_factors))


def color_jitter(images: Array, brightness: Array, contrast: Array, saturation: Array,
                 hue: Optional[Array], orders: Array) -> Array:
  """ColorJitter.forward with given per-image factors and each image's own op order.

  orders[b] is a permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE), like
  ColorJitter.get_params' fn_idx: image b gets adjust_<orders[b, 0]> first. hue=None
  skips the hue op (as ColorJitter does for hue=0); the blend ops are identities at
  factor 1.

  Computed as: the blend ops ordered before hue, hue once for the whole batch, then the
  blend ops ordered after hue. Each blend step applies every image's own op for that
  position (a masked no-op where hue is in it), so hue, the expensive op, runs once rather
  than once per position.
  """
  return _from_planes(_color_jitter(_to_planes(images), brightness, contrast, saturation,
                                    hue, orders))


# ---------------------------------------------------------------------------- sampling

# Every order ColorJitter.get_params' torch.randperm(4) can return, each equally likely.
_JITTER_ORDERS = np.array(list(itertools.permutations(range(NUM_JITTER_OPS))), np.int32)


def _uniform(key: Array, batch: int, ranges: Sequence[tuple[float, float]]) -> Array:
  """torch.empty(1).uniform_(low, high), per image, for each (low, high): (len(ranges), B).

  Each sampler makes one such draw for all its parameters: every separate draw compiles
  to its own copy of the random-bit generator, which is slow to compile on CPU.
  """
  low, high = (np.array(bound, np.float32)[:, None] for bound in zip(*ranges))
  u = jax.random.uniform(key, (len(ranges), batch), jnp.float32)
  return jnp.maximum(low, u * (high - low) + low)


def _integer(u: Array, n: int) -> Array:
  """floor(u) for u ~ U[0, n): uniform on {0, ..., n - 1} (as torch.randint, to within
  float32's 2^-23 resolution)."""
  return jnp.minimum(u.astype(jnp.int32), n - 1)


def _jitter_range(value: Range) -> tuple[float, float]:
  """ColorJitter._check_input for brightness/contrast/saturation: v -> [max(0, 1 - v), 1 + v]."""
  if isinstance(value, (int, float)):
    return max(1.0 - value, 0.0), 1.0 + value
  low, high = value
  return float(low), float(high)


def _symmetric_range(value: Range) -> tuple[float, float]:
  """A number v means [-v, v] (RandomRotation degrees, ColorJitter hue); a pair is as is."""
  if isinstance(value, (int, float)):
    return -float(value), float(value)
  low, high = value
  return float(low), float(high)


def _pair(value: Range) -> tuple[float, float]:
  """(x, y) from one number for both or a pair."""
  return (value, value) if isinstance(value, (int, float)) else tuple(value)


def sample_crop(key: Array, batch: int, padding: int) -> tuple[Array, Array]:
  """RandomCrop.get_params on the padded image: tops, lefts ~ randint(0, 2 * padding]."""
  offsets = 2 * padding + 1
  tops, lefts = _integer(_uniform(key, batch, [(0, offsets)] * 2), offsets)
  return tops, lefts


def sample_hflip(key: Array, batch: int, p: float = HFLIP_PROBABILITY) -> Array:
  """RandomHorizontalFlip: flip when torch.rand(1) < p."""
  return jax.random.uniform(key, (batch,)) < p


def sample_color_jitter(key: Array, batch: int, brightness: Range = 0, contrast: Range = 0,
                        saturation: Range = 0, hue: Range = 0) -> dict:
  """ColorJitter.get_params per image: a uniformly random op order and one factor per op.

  A number v gives factors ~ U[max(0, 1 - v), 1 + v] (hue: U[-v, v]), a pair (lo, hi)
  U[lo, hi], as ColorJitter. Returns color_jitter's keyword arguments; 'hue' is None
  when the hue range is (0, 0), which ColorJitter skips.
  """
  hue_range = _symmetric_range(hue)
  if not all(-MAX_HUE <= h <= MAX_HUE for h in hue_range):
    raise ValueError(f'hue range {hue_range} is outside [-{MAX_HUE}, {MAX_HUE}]')
  num_orders = len(_JITTER_ORDERS)
  b, c, s, h, order = _uniform(key, batch, [
      _jitter_range(brightness), _jitter_range(contrast), _jitter_range(saturation),
      hue_range, (0, num_orders)])
  return dict(brightness=b, contrast=c, saturation=s,
              hue=None if hue_range == (0.0, 0.0) else h,
              orders=jnp.asarray(_JITTER_ORDERS)[_integer(order, num_orders)])


def sample_rotation(key: Array, batch: int, degrees: Range) -> Array:
  """RandomRotation.get_params: angle ~ U[-degrees, degrees] (or U[lo, hi])."""
  return _uniform(key, batch, [_symmetric_range(degrees)])[0]


def max_translation(fraction: float, size: int) -> int:
  """The largest |shift| RandomAffine's translate=fraction draws: round(fraction * size)."""
  return int(round(fraction * size))


def _translate_ranges(fraction: Range, height: int, width: int) -> list[tuple[float, float]]:
  """RandomAffine.get_params' translation ranges: (-fx W, fx W), (-fy H, fy H)."""
  fx, fy = _pair(fraction)
  return [(-fx * width, fx * width), (-fy * height, fy * height)]


def _shifts(u: Array) -> tuple[Array, Array]:
  """int(round(u)) for the dx and dy rows: half to even, as Python's round."""
  dx, dy = jnp.round(u).astype(jnp.int32)
  return dx, dy


def sample_translate(key: Array, batch: int, fraction: Range, height: int,
                     width: int) -> tuple[Array, Array]:
  """RandomAffine.get_params' translations: dx = round(U(-fx W, fx W)), dy likewise.

  `fraction` is translate's (fx, fy) or one number for both.
  """
  return _shifts(_uniform(key, batch, _translate_ranges(fraction, height, width)))


def sample_rotation_translate(key: Array, batch: int, degrees: Range, fraction: Range,
                              height: int, width: int) -> tuple[Array, Array, Array]:
  """sample_rotation and sample_translate's parameters in one draw: angles, dx, dy."""
  u = _uniform(key, batch, [_symmetric_range(degrees),
                            *_translate_ranges(fraction, height, width)])
  return (u[0], *_shifts(u[1:]))


def random_crop(key: Array, images: Array, padding: int, padding_mode: str = 'constant') -> Array:
  """RandomCrop(size=(H, W), padding=padding, padding_mode=padding_mode)."""
  return crop(images, *sample_crop(key, images.shape[0], padding), padding, padding_mode)


def random_hflip(key: Array, images: Array, p: float = HFLIP_PROBABILITY) -> Array:
  """RandomHorizontalFlip(p)."""
  return hflip(images, sample_hflip(key, images.shape[0], p))


def random_color_jitter(key: Array, images: Array, brightness: Range = 0,
                        contrast: Range = 0, saturation: Range = 0, hue: Range = 0) -> Array:
  """ColorJitter(brightness, contrast, saturation, hue) on float images in [0, 1]."""
  params = sample_color_jitter(key, images.shape[0], brightness, contrast, saturation, hue)
  return color_jitter(images, **params)


def random_rotation(key: Array, images: Array, degrees: Range) -> Array:
  """RandomRotation(degrees): nearest, zero fill, about the centre."""
  return rotate(images, sample_rotation(key, images.shape[0], degrees))


def random_translate(key: Array, images: Array, fraction: Range) -> Array:
  """RandomAffine(degrees=0, translate=fraction): nearest, zero fill."""
  batch, height, width = images.shape[:3]
  fx, fy = _pair(fraction)
  bound = max(max_translation(fx, width), max_translation(fy, height))
  return translate(images, *sample_translate(key, batch, fraction, height, width), bound)


def random_rotation_translate(key: Array, images: Array, degrees: Range,
                              fraction: Range) -> Array:
  """RandomRotation(degrees) then RandomAffine(0, translate=fraction), one gather."""
  batch, height, width = images.shape[:3]
  return rotate_translate(images, *sample_rotation_translate(key, batch, degrees, fraction,
                                                              height, width))


# ---------------------------------------------------------------------------- policies

Stage = Callable[[Array, Array], Array]


@dataclasses.dataclass(frozen=True)
class Policy:
  """A training augmentation config.data.augment can name, in both implementations.

  `stages`: the random stages applied, in order, to float images in [0, 1] on the device
  (`augment`). `torchvision(image_size)`: the list of torchvision transforms that do the
  same to one PIL image on the host (input_pipeline.train_transform; ToTensor and
  Normalize follow), or None for a policy that exists on the device only.
  """

  stages: tuple[Stage, ...]
  torchvision: Optional[Callable[[int], list]] = None


POLICIES = Registry('augmentation policy', 'config.data.augment')


def _seed_transforms(image_size: int) -> list:
  """The seed's list."""
  import torchvision.transforms as T
  return [T.RandomCrop(image_size, padding=SEED_CROP_PADDING),
          T.RandomHorizontalFlip(),
          T.ColorJitter(**SEED_JITTER),
          T.RandomRotation(degrees=SEED_ROTATION_DEGREES),
          T.RandomAffine(degrees=0, translate=(SEED_TRANSLATE_FRACTION,) * 2)]


def _flip_crop_transforms(image_size: int) -> list:
  import torchvision.transforms as T
  return [T.RandomCrop(image_size, padding=SEED_CROP_PADDING), T.RandomHorizontalFlip()]


def _reflect_translate_transforms(image_size: int) -> list:
  import torchvision.transforms as T
  return [T.RandomCrop(image_size, padding=SPEEDRUN_TRANSLATE, padding_mode='reflect')]


POLICIES.register('seed', Policy(
    (functools.partial(random_crop, padding=SEED_CROP_PADDING),
     random_hflip,
     functools.partial(random_color_jitter, **SEED_JITTER),
     functools.partial(random_rotation_translate, degrees=SEED_ROTATION_DEGREES,
                       fraction=SEED_TRANSLATE_FRACTION)),
    _seed_transforms))
POLICIES.register('flip_crop', Policy(
    (functools.partial(random_crop, padding=SEED_CROP_PADDING), random_hflip),
    _flip_crop_transforms))
# Translation by up to 2 pixels with reflected borders, the speed runs' augmentation
# (their flips alternate by epoch: config.data.alternating_flip, outside the policy).
POLICIES.register('reflect_translate', Policy(
    (functools.partial(random_crop, padding=SPEEDRUN_TRANSLATE, padding_mode='reflect'),),
    _reflect_translate_transforms))
POLICIES.register('none', Policy((), lambda image_size: []))


def augment(key: Array, images_uint8: Array, policy: str) -> Array:
  """The training augmentation `policy` on a uint8 NHWC batch -> float32 in [0, 1].

  Stage i of the policy draws its parameters from jax.random.fold_in(key, i).
  `policy` is static (a POLICIES name).
  """
  stages = POLICIES.get(policy).stages
  images = to_float(images_uint8)
  for i, stage in enumerate(stages):
    images = stage(jax.random.fold_in(key, i), images)
  return images
