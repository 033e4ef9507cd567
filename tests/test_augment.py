"""jaxres.augment does what the seed's torchvision transforms do, on the same parameters.

Each functional op is compared with torchvision's tensor implementation on float images:
the pixel moves (crop, flip, translate, rotate) exactly, the colour ops within float32
rounding. The seed's transform classes themselves (RandomCrop ... RandomAffine, as
input_pipeline.train_transform('seed') builds them) run with their get_params replaced by
the JAX-drawn parameters, on float tensors (equal within float32 rounding) and on PIL
images as the seed feeds them (the differences PIL's uint8 rounding makes are measured
and bounded here).
"""

import contextlib
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

from experiments import smoke
from jaxres import augment, config_lib, evaluation, input_pipeline
from jaxres.errors import UsageError

COLOUR_ATOL = 1e-5  # float32 rounding; the measured differences are below 1e-6
LEVELS = 255.0  # one 8-bit level is 1 / LEVELS
NEAREST = T.InterpolationMode.NEAREST


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _uint8_images(batch, height=32, width=32, seed=0):
  """Random uint8 NHWC images, with a few hard cases for the colour ops in front."""
  images = np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), np.uint8)
  special = [
      np.repeat(images[0, :, :, :1], 3, axis=-1),                       # gray: h = s = 0
      np.where(np.arange(width)[None, :, None] < width // 2, 0, 255),   # black | white
      np.broadcast_to(np.eye(3, dtype=np.uint8)[np.arange(height * width) % 3]
                      .reshape(height, width, 3) * 255, (height, width, 3)),  # primaries
  ]
  for i, image in enumerate(special[:batch]):
    images[i] = image
  return images


def _float_images(batch, height=32, width=32, seed=0):
  return np.asarray(augment.to_float(_uint8_images(batch, height, width, seed)))


def _tensor(image):
  """HWC numpy -> CHW torch tensor."""
  return torch.from_numpy(np.array(image.transpose(2, 0, 1)))


def _numpy(tensor):
  """CHW torch tensor -> HWC numpy."""
  return tensor.numpy().transpose(1, 2, 0)


def _torchvision(images, fn, *per_image_params):
  """fn(image_tensor, *params_of_that_image) for each image, stacked as NHWC numpy."""
  return np.stack([_numpy(fn(_tensor(image), *(p[i] for p in per_image_params)))
                   for i, image in enumerate(images)])


# ---------------------------------------------------------------------------- pixel moves

def test_to_float_is_to_tensor_bit_for_bit():
  values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
  ours = np.asarray(jax.jit(augment.to_float)(values))
  assert ours.dtype == np.float32
  np.testing.assert_array_equal(ours, _numpy(F.to_tensor(values[0]))[None])


@pytest.mark.parametrize('height,width', [(32, 32), (20, 27)])
def test_crop_is_pad_then_crop(height, width):
  padding = augment.SEED_CROP_PADDING
  images = _float_images(6, height, width)
  tops = np.array([0, 2 * padding, 3, 5, 0, 2 * padding])
  lefts = np.array([0, 2 * padding, 6, 1, 2 * padding, 0])
  ours = jax.jit(augment.crop, static_argnums=3)(images, tops, lefts, padding)
  expected = _torchvision(
      images, lambda t, top, left: F.crop(F.pad(t, padding, fill=0), int(top), int(left),
                                          height, width), tops, lefts)
  np.testing.assert_array_equal(ours, expected)


def test_crop_and_flip_keep_the_dtype():
  images = _uint8_images(4)
  cropped = jax.jit(augment.crop, static_argnums=3)(images, np.arange(4), np.arange(4), 4)
  flipped = jax.jit(augment.hflip)(images, np.array([True, False, True, False]))
  assert cropped.dtype == flipped.dtype == np.uint8


def test_hflip():
  images = _float_images(4)
  flags = np.array([True, False, True, False])
  expected = _torchvision(images, lambda t, f: F.hflip(t) if f else t, flags)
  np.testing.assert_array_equal(jax.jit(augment.hflip)(images, flags), expected)


def _affine_translate(tensor, dx, dy):
  return F.affine(tensor, angle=0.0, translate=[int(dx), int(dy)], scale=1.0, shear=[0.0, 0.0],
                  interpolation=NEAREST, fill=[0.0] * tensor.shape[0])


@pytest.mark.parametrize('height,width', [(32, 32), (20, 27)])
def test_translate_is_torchvision_affine(height, width):
  images = _float_images(8, height, width)
  dx = np.array([0, 3, -3, 1, -width, width + 5, 2, -1])
  dy = np.array([0, -3, 3, 2, 0, -1, height, -height - 2])
  expected = _torchvision(images, _affine_translate, dx, dy)
  np.testing.assert_array_equal(jax.jit(augment.translate)(images, dx, dy), expected)
  bounded = jax.jit(augment.translate, static_argnums=3)
  np.testing.assert_array_equal(bounded(images[:4], dx[:4], dy[:4], 3), expected[:4])


@pytest.mark.parametrize('mode', ['reflect', 'constant'])
def test_static_shift_is_the_per_image_shift(mode):
  """evaluation.shift, the test-time views' pixel move, is the training shift's."""
  images = _float_images(3, 20, 27)
  for dy, dx in [(0, 0), (1, -1), (-2, 0), (0, 3), (4, 4)]:
    expected = augment._shift(images, np.full(3, dy), np.full(3, dx), (4, 4), mode)
    np.testing.assert_array_equal(evaluation.shift(images, dy, dx, mode), expected)
  # The content moves down and right: row 0 of the image is row 1 of the shifted one.
  np.testing.assert_array_equal(evaluation.shift(images, 1, 0)[:, 1:], images[:, :-1])


# Angles of the seed's range, its ends, and angles where pixel centres land exactly on
# grid points (multiples of 90 degrees) or on rounding ties.
ANGLES = (0.0, 15.0, -15.0, 7.3, -11.91, 1e-3, 45.0, 90.0, -90.0, 180.0, 30.0, -2.5)


@pytest.mark.parametrize('height,width', [(32, 32), (24, 40), (31, 33)])
def test_rotate_is_torchvision_rotate(height, width):
  # Pixel values 1..H*W identify the source pixel (0: fill), so equality means the same
  # pixel was taken everywhere; then a random image through the same path.
  index_image = np.arange(1, height * width + 1, dtype=np.float32).reshape(1, height, width, 1)
  index_images = np.broadcast_to(index_image, (len(ANGLES), height, width, 1))
  angles = np.array(ANGLES, np.float32)
  rotate = jax.jit(augment.rotate)
  expected = _torchvision(index_images, lambda t, a: F.rotate(t, float(a), NEAREST, fill=[0.0]),
                          angles)
  np.testing.assert_array_equal(rotate(index_images, angles), expected)
  images = _float_images(len(ANGLES), height, width)
  expected = _torchvision(images, lambda t, a: F.rotate(t, float(a), NEAREST, fill=[0.0] * 3),
                          angles)
  np.testing.assert_array_equal(rotate(images, angles), expected)


def test_rotate_translate_is_rotate_then_translate():
  images = _float_images(6)
  angles = np.array([15.0, -15.0, 3.3, 0.0, -9.0, 90.0], np.float32)
  dx = np.array([3, -3, 0, 1, -2, 40])
  dy = np.array([-3, 0, 2, 3, -1, 0])
  ours = jax.jit(augment.rotate_translate)(images, angles, dx, dy)
  two_steps = jax.jit(lambda *a: augment.translate(augment.rotate(*a[:2]), *a[2:]))
  np.testing.assert_array_equal(ours, two_steps(images, angles, dx, dy))
  expected = _torchvision(
      images, lambda t, a, x, y: _affine_translate(F.rotate(t, float(a), NEAREST, fill=[0.0] * 3),
                                                   x, y), angles, dx, dy)
  np.testing.assert_array_equal(ours, expected)


# ---------------------------------------------------------------------------- colour

# (our op, torchvision's, factor range, extreme factors also tried)
COLOUR_OPS = [(augment.adjust_brightness, F.adjust_brightness, (0.8, 1.2), (0.0, 1.0, 2.0)),
              (augment.adjust_contrast, F.adjust_contrast, (0.8, 1.2), (0.0, 1.0, 2.0)),
              (augment.adjust_saturation, F.adjust_saturation, (0.8, 1.2), (0.0, 1.0, 2.0)),
              (augment.adjust_hue, F.adjust_hue, (-0.1, 0.1), (-0.5, 0.0, 0.5))]


@pytest.mark.parametrize('ours,theirs,factor_range,extremes', COLOUR_OPS,
                         ids=[op.__name__ for op, *_ in COLOUR_OPS])
def test_colour_op_is_torchvision(ours, theirs, factor_range, extremes):
  rng = np.random.default_rng(1)
  factors = np.concatenate([extremes, factor_range, rng.uniform(*factor_range, 11)])
  factors = factors.astype(np.float32)
  images = _float_images(len(factors))
  expected = _torchvision(images, lambda t, f: theirs(t, float(f)), factors)
  result = jax.jit(ours)(images, factors)
  assert result.dtype == np.float32 and result.shape == images.shape
  np.testing.assert_allclose(result, expected, rtol=0, atol=COLOUR_ATOL)


ALL_ORDERS = np.array(list(itertools.permutations(range(augment.NUM_JITTER_OPS))))
jit_color_jitter = jax.jit(augment.color_jitter)


@contextlib.contextmanager
def _fixed_jitter_params(params):
  """ColorJitter draws `params` (an iterator of get_params results) instead of its own."""
  original = T.ColorJitter.__dict__['get_params']  # the staticmethod itself, to restore
  T.ColorJitter.get_params = staticmethod(lambda *_: next(params))
  try:
    yield
  finally:
    T.ColorJitter.get_params = original


@pytest.mark.parametrize('with_hue', [True, False])
def test_color_jitter_is_torchvision_color_jitter_in_every_order(with_hue):
  # One image per op order (all 24), each with its own factors.
  batch = len(ALL_ORDERS)
  rng = np.random.default_rng(2)
  b, c, s = rng.uniform(0.6, 1.4, (3, batch)).astype(np.float32)
  h = rng.uniform(-0.3, 0.3, batch).astype(np.float32) if with_hue else None
  images = _float_images(batch)
  ours = jit_color_jitter(images, b, c, s, h, ALL_ORDERS)
  jitter = T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4,
                         hue=0.3 if with_hue else 0)
  params = iter([(torch.tensor(ALL_ORDERS[i]), float(b[i]), float(c[i]), float(s[i]),
                  float(h[i]) if with_hue else None) for i in range(batch)])
  with _fixed_jitter_params(params):
    expected = _torchvision(images, jitter)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=COLOUR_ATOL)


def test_color_jitter_order_changes_the_result():
  image = _float_images(4)[3:4]
  images = np.repeat(image, len(ALL_ORDERS), axis=0)
  factors = np.full(len(ALL_ORDERS), 1.4, np.float32)
  hue = np.full(len(ALL_ORDERS), 0.25, np.float32)
  out = np.asarray(jit_color_jitter(images, factors, factors * 0.5, factors, hue, ALL_ORDERS))
  distinct = {out[i].round(5).tobytes() for i in range(len(out))}
  assert len(distinct) > len(ALL_ORDERS) // 2


# ---------------------------------------------------------------------------- sampling

KEY = jax.random.key(7)


@jax.jit
def _seed_parameters(key):
  """A large sample of every seed parameter."""
  batch = 4096
  return dict(crop=augment.sample_crop(key, batch, augment.SEED_CROP_PADDING),
              flip=augment.sample_hflip(key, batch),
              jitter=augment.sample_color_jitter(key, batch, **augment.SEED_JITTER),
              angle=augment.sample_rotation(key, batch, augment.SEED_ROTATION_DEGREES),
              translate=augment.sample_translate(key, batch, augment.SEED_TRANSLATE_FRACTION,
                                                 32, 32),
              rotation_translate=augment.sample_rotation_translate(
                  key, batch, augment.SEED_ROTATION_DEGREES, augment.SEED_TRANSLATE_FRACTION,
                  32, 32))


def test_sampled_parameters_follow_torchvision_distributions():
  p = jax.tree.map(np.asarray, _seed_parameters(KEY))
  for offsets in p['crop']:
    assert set(np.unique(offsets)) == set(range(9))
  assert p['flip'].dtype == bool and 0.45 < p['flip'].mean() < 0.55

  for name in ('brightness', 'contrast', 'saturation'):
    values = p['jitter'][name]
    assert values.dtype == np.float32 and 0.8 <= values.min() and values.max() <= 1.2
    assert values.min() < 0.81 and values.max() > 1.19
  hue = p['jitter']['hue']
  assert -0.1 <= hue.min() < -0.099 and 0.099 < hue.max() <= 0.1
  orders = p['jitter']['orders']
  np.testing.assert_array_equal(np.sort(orders, axis=1), np.tile(np.arange(4), (len(orders), 1)))
  assert len({tuple(o) for o in orders}) == 24

  angle, *translate = p['rotation_translate']
  for angles, shifts in ((p['angle'], p['translate']), (angle, translate)):
    assert -15 <= angles.min() < -14.9 and 14.9 < angles.max() <= 15
    for shift in shifts:
      assert shift.dtype == np.int32 and set(np.unique(shift)) == set(range(-3, 4))
      # round(U(-3.2, 3.2)), not a uniform integer: |dx| = 3 has mass 1.4 / 6.4, not 2 / 7.
      assert 0.19 < np.mean(np.abs(shift) == 3) < 0.25
  assert augment.max_translation(0.1, 32) == 3


def test_jitter_ranges_as_color_jitter_checks_them():
  assert augment._jitter_range(0.2) == (0.8, 1.2)
  assert augment._jitter_range(2.0) == (0.0, 3.0)  # [max(0, 1 - v), 1 + v]
  assert augment._jitter_range((0.5, 0.6)) == (0.5, 0.6)  # a pair is the range itself
  shapes = jax.eval_shape(lambda k: augment.sample_color_jitter(k, 4, brightness=0.2), KEY)
  assert shapes['hue'] is None  # hue=0: ColorJitter skips the op
  with pytest.raises(ValueError, match='hue'):
    augment.sample_color_jitter(KEY, 4, hue=0.6)


def test_sampled_parameters_differ_per_image_and_are_deterministic():
  params = jax.tree.leaves(_seed_parameters(KEY))
  again = jax.tree.leaves(_seed_parameters(KEY))
  other = jax.tree.leaves(_seed_parameters(jax.random.key(8)))
  for leaf, same, different in zip(params, again, other):
    np.testing.assert_array_equal(leaf, same)
    assert len(np.unique(np.asarray(leaf), axis=0)) > 1
    assert not np.array_equal(leaf, different)


@jax.jit
def _random_and_functional(key, images):
  """random_rotation and random_translate, and their functional ops on the parameters
  their samplers draw. (The other random ops are checked through the policies.)"""
  batch = images.shape[0]
  return [(augment.random_rotation(key, images, 15),
           augment.rotate(images, augment.sample_rotation(key, batch, 15))),
          (augment.random_translate(key, images, 0.1),
           augment.translate(images, *augment.sample_translate(key, batch, 0.1, 32, 32)))]


def test_random_ops_apply_their_sampled_parameters():
  for random_op, functional_op in _random_and_functional(KEY, _float_images(4)):
    np.testing.assert_array_equal(random_op, functional_op)


# ---------------------------------------------------------------------------- policies

POLICY_BATCH = 8  # one batch shape for every augment call, so each policy compiles once
jit_augment = jax.jit(augment.augment, static_argnames='policy')


@functools.partial(jax.jit, static_argnums=(1, 2))
def _policy_params(key, batch, crop_padding=augment.SEED_CROP_PADDING):
  """The parameters augment(key, ., policy) draws: stage i from fold_in(key, i), where
  'seed' has the stages (crop, flip, jitter, rotation+translation), 'flip_crop' the
  first two and 'reflect_translate' the crop alone (padding 2, reflected)."""
  k_crop, k_flip, k_jitter, k_geometry = (jax.random.fold_in(key, i) for i in range(4))
  angle, dx, dy = augment.sample_rotation_translate(
      k_geometry, batch, augment.SEED_ROTATION_DEGREES, augment.SEED_TRANSLATE_FRACTION, 32, 32)
  return dict(crop=augment.sample_crop(k_crop, batch, crop_padding),
              flip=augment.sample_hflip(k_flip, batch),
              jitter=augment.sample_color_jitter(k_jitter, batch, **augment.SEED_JITTER),
              angle=angle, translate=(dx, dy))


@contextlib.contextmanager
def _torchvision_policy(policy, params):
  """transforms(i): input_pipeline's torchvision transforms for `policy` (without ToTensor
  and Normalize), drawing image i's parameters from `params` instead of torch's RNG."""
  ops = [op for op in input_pipeline.train_transform(policy).transforms
         if not isinstance(op, (T.ToTensor, T.Normalize))]
  p = jax.tree.map(np.asarray, params)
  current = {}

  def jitter_params(*_):
    i = current['i']
    return (torch.tensor(p['jitter']['orders'][i]),
            *(float(p['jitter'][name][i]) for name in ('brightness', 'contrast', 'saturation',
                                                       'hue')))

  patched = {
      T.RandomCrop: lambda img, size: (int(p['crop'][0][current['i']]),
                                       int(p['crop'][1][current['i']]), *size),
      T.ColorJitter: jitter_params,
      T.RandomRotation: lambda degrees: float(p['angle'][current['i']]),
      T.RandomAffine: lambda *_: (0.0, (int(p['translate'][0][current['i']]),
                                        int(p['translate'][1][current['i']])), 1.0, (0.0, 0.0)),
  }
  originals = {cls: cls.__dict__['get_params'] for cls in patched}  # the staticmethods

  def transforms(i):
    current['i'] = i
    for op in ops:
      if isinstance(op, T.RandomHorizontalFlip):
        op.p = 1.0 if p['flip'][i] else 0.0
    return T.Compose(ops)

  try:
    for cls, fn in patched.items():
      cls.get_params = staticmethod(fn)
    yield transforms
  finally:
    for cls, fn in originals.items():
      cls.get_params = fn


def _policy_three_ways(policy, seed=3):
  """augment(policy) and input_pipeline's torchvision transforms for it, on float tensors
  and on PIL images (uint8), with the same parameters: three NHWC arrays."""
  images = _uint8_images(POLICY_BATCH, seed=seed)
  key = jax.random.key(seed)
  ours = np.asarray(jit_augment(key, images, policy=policy))
  padding = (augment.SPEEDRUN_TRANSLATE if policy == 'reflect_translate'
             else augment.SEED_CROP_PADDING)
  with _torchvision_policy(policy, _policy_params(key, POLICY_BATCH, padding)) as transforms:
    tensor_path = np.stack([_numpy(transforms(i)(F.to_tensor(image)))
                            for i, image in enumerate(images)])
    pil_path = np.stack([np.asarray(transforms(i)(Image.fromarray(image)))
                         for i, image in enumerate(images)])
  return ours, tensor_path, pil_path


@pytest.mark.parametrize('policy', sorted(augment.POLICIES))
def test_augment_under_jit(policy):
  images = _uint8_images(POLICY_BATCH)
  out = jit_augment(KEY, images, policy=policy)
  assert out.shape == images.shape and out.dtype == jnp.float32
  assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
  np.testing.assert_array_equal(out, jit_augment(KEY, images, policy=policy))
  if policy != 'none':
    assert not np.array_equal(out, jit_augment(jax.random.key(8), images, policy=policy))


def test_unknown_policy():
  with pytest.raises(UsageError, match='config.data.augment must be one of seed, flip_crop, '
                     'reflect_translate or none'):
    augment.augment(KEY, _uint8_images(1), 'autoaugment')


def test_a_policy_registered_outside_is_validated_and_used(register_for_test):
  """A device-only policy (no torchvision transforms): validation accepts it with the data
  on the device, refuses it on the torchvision path; augment applies its stages."""
  register_for_test(augment.POLICIES, 'mirror', augment.Policy((augment.random_hflip,)))
  config = smoke.get_config()
  config.data.augment, config.data.on_device = 'mirror', True
  config_lib.validate(config)
  images = _uint8_images(POLICY_BATCH)
  expected = augment.random_hflip(jax.random.fold_in(KEY, 0), augment.to_float(images))
  np.testing.assert_array_equal(jit_augment(KEY, images, policy='mirror'), expected)
  config.data.on_device = False
  with pytest.raises(UsageError, match='config.data.augment=mirror runs on the device only'):
    config_lib.validate(config)
  with pytest.raises(UsageError, match='runs on the device only'):
    input_pipeline.train_transform('mirror')


@pytest.mark.parametrize('policy', sorted(augment.POLICIES))
def test_policy_is_input_pipelines_torchvision_transforms(policy):
  ours, tensor_path, pil_path = _policy_three_ways(policy)
  if policy == 'seed':
    np.testing.assert_allclose(ours, tensor_path, rtol=0, atol=COLOUR_ATOL)
  else:  # pixel moves only: exact, on tensors and on PIL images alike
    np.testing.assert_array_equal(ours, tensor_path)
    np.testing.assert_array_equal(ours * LEVELS, pil_path)


# How far PIL's uint8 path (the seed's) is from the float path, in 8-bit levels, on the
# seed's parameter ranges (measured values in the comments). A blend rounds once. PIL's
# adjust_hue works on a 0..255 HSV grid and truncates hue_factor * 255 to an integer, up to
# 1/255 turn off, which moves a saturated bright pixel by up to ~13 levels. PIL's nearest
# rotation breaks near-ties between source pixels differently on a few pixels. Along the
# seed's chain the roundings accumulate.
PIL_BLEND_MAX_LEVELS = 1.1     # brightness, contrast, saturation: max 1.09
PIL_HUE_MAX_LEVELS = 16.0      # max 13.4
PIL_HUE_MEAN_LEVELS = 1.0      # mean 0.70
PIL_ROTATION_MISMATCH = 1e-3   # pixels taken from another source pixel: 2e-4
PIL_CHAIN_MEAN_LEVELS = 1.5    # whole seed chain: mean 1.1 to 1.4
PIL_CHAIN_FAR_LEVELS = 4.0
PIL_CHAIN_FAR_FRACTION = 0.08  # pixels more than PIL_CHAIN_FAR_LEVELS apart: 3.6% to 5.3%


def test_seed_policy_is_close_to_the_seeds_pil_path():
  ours, _, pil_path = _policy_three_ways('seed')
  levels = np.abs(ours * LEVELS - pil_path.astype(np.float32))
  assert levels.mean() < PIL_CHAIN_MEAN_LEVELS
  assert np.mean(levels > PIL_CHAIN_FAR_LEVELS) < PIL_CHAIN_FAR_FRACTION


@pytest.mark.parametrize('ours,theirs', [(augment.adjust_brightness, F.adjust_brightness),
                                         (augment.adjust_contrast, F.adjust_contrast),
                                         (augment.adjust_saturation, F.adjust_saturation),
                                         (augment.adjust_hue, F.adjust_hue)])
def test_colour_op_on_pil_is_within_a_few_levels(ours, theirs):
  images = _uint8_images(8, seed=4)
  rng = np.random.default_rng(4)
  factors = (rng.uniform(-0.1, 0.1, len(images)) if ours is augment.adjust_hue
             else rng.uniform(0.8, 1.2, len(images))).astype(np.float32)
  pil = np.stack([np.asarray(theirs(Image.fromarray(image), float(f)))
                  for image, f in zip(images, factors)])
  levels = np.abs(np.asarray(jax.jit(ours)(augment.to_float(images), factors)) * LEVELS - pil)
  if ours is augment.adjust_hue:
    assert levels.max() < PIL_HUE_MAX_LEVELS and levels.mean() < PIL_HUE_MEAN_LEVELS
  else:
    assert levels.max() < PIL_BLEND_MAX_LEVELS


def test_rotate_on_pil_takes_the_same_pixels_almost_everywhere():
  images = _uint8_images(16, seed=5)
  angles = np.random.default_rng(5).uniform(-15, 15, len(images)).astype(np.float32)
  pil = np.stack([np.asarray(F.rotate(Image.fromarray(image), float(a), NEAREST, fill=0))
                  for image, a in zip(images, angles)])
  ours = np.asarray(jax.jit(augment.rotate)(images, angles))
  assert np.mean(np.any(ours != pil, axis=-1)) < PIL_ROTATION_MISMATCH
