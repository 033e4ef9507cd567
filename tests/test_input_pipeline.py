import os

import ml_collections
import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image

from experiments import base, smoke
from jaxres import config_lib, input_pipeline
from jaxres.errors import UsageError


def _params(t):
  return {k: v for k, v in vars(t).items() if not k.startswith('_') and k != 'training'}


def test_seed_transform_list():
  ops = input_pipeline.train_transform('seed').transforms
  assert [type(t) for t in ops] == [T.RandomCrop, T.RandomHorizontalFlip, T.ColorJitter,
                                    T.RandomRotation, T.RandomAffine, T.ToTensor, T.Normalize]
  crop, flip, jitter, rotation, affine, _, norm = ops
  assert crop.size == (32, 32) and crop.padding == 4
  assert flip.p == 0.5
  assert jitter.brightness == (0.8, 1.2) and jitter.contrast == (0.8, 1.2)
  assert jitter.saturation == (0.8, 1.2) and jitter.hue == (-0.1, 0.1)
  assert rotation.degrees == [-15.0, 15.0]
  assert affine.degrees == [0.0, 0.0] and affine.translate == (0.1, 0.1)
  assert norm.mean == (0.5, 0.5, 0.5) and norm.std == (0.5, 0.5, 0.5)
  test_ops = input_pipeline.test_transform().transforms
  assert [type(t) for t in test_ops] == [T.ToTensor, T.Normalize]


def test_base_config_builds_the_seed_pipeline():
  config = base.get_config()
  train = input_pipeline.Split(np.zeros((300, 32, 32, 3), np.uint8), np.zeros(300, np.int64), ('a',))
  loader = input_pipeline.train_loader(train, config)
  assert loader.batch_size == 128 and loader.shuffle and not loader.drop_last
  assert loader.num_batches == 3  # 128 + 128 + 44: the partial batch is kept
  assert [type(t) for t in loader.transform.transforms][:5] == [
      T.RandomCrop, T.RandomHorizontalFlip, T.ColorJitter, T.RandomRotation, T.RandomAffine]
  assert input_pipeline.eval_loader(train, config).batch_size == 100


def test_normalize_matches_torchvision_bit_for_bit():
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  ours = input_pipeline.normalize(images)
  theirs = np.stack([input_pipeline.test_transform()(Image.fromarray(i)).numpy().transpose(1, 2, 0)
                     for i in images])
  np.testing.assert_array_equal(ours, theirs)


def test_synthetic_is_deterministic_balanced_and_class_dependent():
  train, test = input_pipeline.synthetic(200, 100, seed=3)
  again, _ = input_pipeline.synthetic(200, 100, seed=3)
  np.testing.assert_array_equal(train.images, again.images)
  assert train.images.shape == (200, 32, 32, 3) and train.images.dtype == np.uint8
  assert np.bincount(train.labels).tolist() == [20] * 10
  # Class means differ far more than samples within a class vary around them.
  means = np.stack([train.images[train.labels == c].mean(0) for c in range(10)])
  assert np.abs(means[0] - means[1]).mean() > 5


def _tiny_split(n=10):
  rng = np.random.default_rng(0)
  return input_pipeline.Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                              np.arange(n) % 10, tuple(str(i) for i in range(10)))


def test_batches_are_a_pure_function_of_seed_epoch_and_step():
  split = _tiny_split(10)
  make = lambda **kw: input_pipeline.Loader(split, 4, input_pipeline.train_transform('seed'),
                                            seed=1, shuffle=True, augment_seeds=True, **kw)
  full = list(make().epoch(2))
  assert [len(b['label']) for b in full] == [4, 4, 2]
  assert full[0]['image'].shape == (4, 32, 32, 3) and full[0]['image'].dtype == np.float32
  resumed = list(make().epoch(2, start_step=1))  # a run resumed mid-epoch
  np.testing.assert_array_equal(resumed[0]['image'], full[1]['image'])
  workers = list(make(num_workers=2).epoch(2))  # the number of workers does not matter
  for a, b in zip(full, workers):
    np.testing.assert_array_equal(a['image'], b['image'])
  other_epoch = list(make().epoch(3))
  assert not np.array_equal(other_epoch[0]['image'], full[0]['image'])


def test_processes_split_each_global_batch():
  split = _tiny_split(10)
  make = lambda p: input_pipeline.Loader(split, 4, input_pipeline.test_transform(), seed=0,
                                         shuffle=True, process_index=p, process_count=2)
  single = input_pipeline.Loader(split, 4, input_pipeline.test_transform(), seed=0, shuffle=True)
  for step in range(3):
    joined = make(0).batch_items(0, step) + make(1).batch_items(0, step)
    assert joined == single.batch_items(0, step)


def test_partial_batch_trimmed_to_device_multiple_and_eval_padded():
  split = _tiny_split(10)
  loader = input_pipeline.Loader(split, 4, input_pipeline.test_transform(), multiple_of=4)
  assert loader.num_batches == 2  # the 2 leftover images do not fill 4 devices
  evaluation = input_pipeline.Loader(split, 4, input_pipeline.test_transform(), pad_to_full=True)
  batches = list(evaluation.epoch(0))
  assert batches[-1]['mask'].tolist() == [1, 1, 0, 0]
  assert batches[-1]['image'].shape == (4, 32, 32, 3)
  on_3_devices = input_pipeline.Loader(split, 4, None, pad_to_full=True, multiple_of=3)
  assert [b['mask'].tolist() for b in on_3_devices.epoch(0)][-1] == [1, 1, 0, 0, 0, 0]


def test_eval_batches_without_dataloader_equal_the_torchvision_path():
  split = _tiny_split(10)
  plain = list(input_pipeline.Loader(split, 4, None, pad_to_full=True).epoch(0))
  torch_path = list(input_pipeline.Loader(split, 4, input_pipeline.test_transform(),
                                          pad_to_full=True).epoch(0))
  for a, b in zip(plain, torch_path):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(a[key], b[key])


def test_imagefolder(tmp_path):
  for split in ('train', 'test'):
    for c in ('b_cls', 'a_cls'):
      os.makedirs(tmp_path / split / c)
      for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / split / c / f'{i}.png')
  data = ml_collections.ConfigDict({'name': 'imagefolder', 'root': str(tmp_path), 'image_size': 32})
  train, test = input_pipeline.load(data)
  assert train.classes == ('a_cls', 'b_cls')  # sorted, as CIFAR-10's label order is
  assert train.images.shape == (4, 32, 32, 3) and test.labels.tolist() == [0, 0, 1, 1]


def test_imagefolder_equals_torchvisions_imagefolder(tmp_path):
  """Same files, order, labels and pixels as torchvision.datasets.ImageFolder (nested
  folders, upper-case extensions, grayscale JPEGs, files that are not images)."""
  import torchvision
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for c in ('dog', 'cat'):
      os.makedirs(tmp_path / split / c / 'more')
      for name in ('b.jpg', 'a.JPEG', 'more/c.png'):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(
            tmp_path / split / c / name, format='PNG' if name.endswith('png') else 'JPEG')
      Image.fromarray(rng.integers(0, 256, (32, 32), np.uint8)).save(
          tmp_path / split / c / 'gray.jpg')
      (tmp_path / split / c / 'notes.txt').write_text('not an image')
  data = ml_collections.ConfigDict({'name': 'imagefolder', 'root': str(tmp_path), 'image_size': 32})
  train, _ = input_pipeline.load(data)
  ref = torchvision.datasets.ImageFolder(str(tmp_path / 'train'))
  assert train.classes == tuple(ref.classes) == ('cat', 'dog')
  assert train.labels.tolist() == ref.targets
  np.testing.assert_array_equal(train.images, np.stack([np.asarray(img) for img, _ in ref]))

  (tmp_path / 'train' / 'cat' / 'b.jpg').write_bytes(b'\xff\xd8\xff broken')
  with pytest.raises(UsageError, match='cannot read image .*b.jpg'):
    input_pipeline.load(data)
  os.makedirs(tmp_path / 'test' / 'empty')
  with pytest.raises(UsageError, match='no images in class folder empty'):
    input_pipeline._load_imagefolder(str(tmp_path / 'test'), 32)


def test_imagefolder_wrong_size_and_missing(tmp_path):
  os.makedirs(tmp_path / 'train' / 'a')
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / 'train' / 'a' / 'x.png')
  data = ml_collections.ConfigDict({'name': 'imagefolder', 'root': str(tmp_path), 'image_size': 32})
  with pytest.raises(UsageError, match='must be 32x32'):
    input_pipeline.load(data)
  data.root = str(tmp_path / 'nope')
  with pytest.raises(UsageError, match='does not exist'):
    input_pipeline.load(data)


def test_cifar10_offline_gives_one_clear_error(tmp_path):
  data = base.get_config().data
  data.root = str(tmp_path / 'cifar')
  data.download = False
  with pytest.raises(UsageError) as e:
    input_pipeline.load(data)
  message = str(e.value)
  assert str(tmp_path / 'cifar') in message and 'imagefolder' in message and '\n' not in message


def test_hold_out_is_a_seeded_disjoint_split_in_training_order():
  train = input_pipeline.Split(np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1),
                               np.arange(100) % 10, tuple('abcdefghij'))
  rest, held = input_pipeline.hold_out(train, 30, seed=0)
  assert (len(rest), len(held)) == (70, 30)
  rest_ids, held_ids = rest.images.ravel(), held.images.ravel()
  assert set(rest_ids).isdisjoint(held_ids) and len(set(rest_ids) | set(held_ids)) == 100
  assert list(rest_ids) == sorted(rest_ids) and list(held_ids) == sorted(held_ids)
  np.testing.assert_array_equal(held.labels, held_ids % 10)
  again, _ = input_pipeline.hold_out(train, 30, seed=0)
  other, _ = input_pipeline.hold_out(train, 30, seed=1)
  np.testing.assert_array_equal(again.images, rest.images)
  assert not np.array_equal(other.images, rest.images)
  with pytest.raises(UsageError, match='data.holdout=100 must be between 1 and 99'):
    input_pipeline.hold_out(train, 100, seed=0)


def test_evaluation_split_is_the_test_set_unless_holdout(tmp_path):
  config = smoke.get_config()
  train, test = input_pipeline.load(config.data)
  assert input_pipeline.evaluation_split(config.data, train, test) == (train, test, 'test')
  config.data.holdout = 24
  rest, held, name = input_pipeline.evaluation_split(config.data, train, test)
  assert (len(rest), len(held), name) == (len(train) - 24, 24, 'holdout')


def test_balanced_subset_is_class_balanced_fixed_and_in_order():
  labels = np.concatenate([np.full(30, c) for c in range(3)] + [np.full(8, 3)])
  split = input_pipeline.Split(np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1),
                               labels, tuple('abcd'))
  subset = input_pipeline.balanced_subset(split, 26)
  assert np.bincount(subset.labels).tolist() == [7, 7, 6, 6]  # the first classes one more
  ids = subset.images.ravel()
  assert list(ids) == sorted(ids) and subset.classes == split.classes
  np.testing.assert_array_equal(split.labels[ids], subset.labels)
  np.testing.assert_array_equal(input_pipeline.balanced_subset(split, 26).images, subset.images)
  assert input_pipeline.balanced_subset(split, 0) is split
  with pytest.raises(UsageError, match="data.train_subset=36: class 'd' has 8 images"):
    input_pipeline.balanced_subset(split, 36, 'data.train_subset')
  with pytest.raises(UsageError, match='data.test_subset=99 must be between 1 and'):
    input_pipeline.balanced_subset(split, 99, 'data.test_subset')


def test_load_takes_the_configured_subsets():
  config = smoke.get_config()
  config.data.train_subset, config.data.test_subset = 200, 50
  train, test = input_pipeline.load(config.data)
  full_train, _ = input_pipeline.load(smoke.get_config().data)
  assert (len(train), len(test)) == (200, 50)
  assert np.bincount(train.labels).tolist() == [20] * 10
  assert np.bincount(test.labels).tolist() == [5] * 10
  np.testing.assert_array_equal(
      train.images, input_pipeline.balanced_subset(full_train, 200).images)
  config.data.test_subset = -1
  with pytest.raises(UsageError, match='config.data.test_subset must be an integer >= 0'):
    config_lib.validate(config)


def test_a_dataset_registered_outside_is_validated_and_loaded(register_for_test):
  """A loader of (config.data, seed) registered under a name: config.data.name chooses it,
  and load applies the configured subsets to its splits as to any source's."""
  calls = []

  def stripes(data, seed):
    calls.append(seed)
    return input_pipeline.synthetic(60, 30, image_size=data.image_size, seed=seed + 1)

  register_for_test(input_pipeline.DATASETS, 'stripes', stripes)
  config = smoke.get_config()
  config.data.name, config.data.train_subset = 'stripes', 20
  config_lib.validate(config)
  train, test = input_pipeline.load(config.data, seed=4)
  assert calls == [4] and (len(train), len(test)) == (20, 30)
  np.testing.assert_array_equal(test.images, input_pipeline.synthetic(60, 30, seed=5)[1].images)
  config.data.name = 'stripe'
  with pytest.raises(UsageError, match='config.data.name must be one of cifar10, imagefolder, '
                     "synthetic or stripes, got 'stripe'"):
    config_lib.validate(config)
