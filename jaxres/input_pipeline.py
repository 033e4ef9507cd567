"""CIFAR-10-style data through torchvision, handed to JAX as NHWC numpy batches.

Sources (config.data.name, a `DATASETS` entry):
  cifar10      torchvision.datasets.CIFAR10(root, download=config.data.download)
  imagefolder  ROOT/train/<class>/* and ROOT/test/<class>/* (torchvision ImageFolder's
               layout, order and pixels, read without torch; classes sorted, which is
               CIFAR-10's label order for its class names)
  synthetic    a small learnable dataset generated in memory (tests, smoke config)
A dataset from outside the package is a function of (config.data, seed) returning the
(train, test) Splits, registered under a name: `@input_pipeline.DATASETS.register('mine')`
in a module the config file imports.

Every source is decoded once into a uint8 array (N, H, W, 3). Training batches then go
through the seed's torchvision transforms in a torch DataLoader. The order and the
augmentation randomness are pure functions of (seed, epoch, position in the epoch): each
sample's transforms run under a torch RNG seeded for that sample, so the batches do not
depend on the number of workers, on how many processes share the epoch, or on whether
the run was resumed.
"""

import dataclasses
import os
from typing import Iterator, Optional, Sequence

import ml_collections
import numpy as np

from jaxres import augment as augment_lib
from jaxres.errors import UsageError
from jaxres.registry import Registry

# The seed normalizes with mean 0.5 and std 0.5 per channel.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
PREFETCH_FACTOR = 4  # batches each DataLoader worker prepares ahead
SUBSET_SEED = 0  # the choice of data.train_subset / data.test_subset's images
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog',
                   'horse', 'ship', 'truck')


@dataclasses.dataclass(frozen=True)
class Split:
  """One split held in memory: uint8 images (N, H, W, 3), int labels (N,)."""

  images: np.ndarray
  labels: np.ndarray
  classes: Sequence[str]

  def __len__(self):
    return len(self.labels)


# ---------------------------------------------------------------------------- transforms

def train_transform(augment: str, image_size: int = 32, mean=MEAN, std=STD):
  """The torchvision transform for training batches: the policy `augment`'s
  (augment.POLICIES; 'seed' is the seed's list), then ToTensor and Normalize."""
  import torchvision.transforms as T
  policy = augment_lib.POLICIES.get(augment)
  if policy.torchvision is None:
    raise UsageError(f'config.data.augment={augment} runs on the device only: set '
                     f'config.data.on_device=True')
  ops = policy.torchvision(image_size)
  return T.Compose(ops + [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


def test_transform(mean=MEAN, std=STD):
  import torchvision.transforms as T
  return T.Compose([T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


def normalize(images_uint8: np.ndarray, mean=MEAN, std=STD) -> np.ndarray:
  """ToTensor + Normalize for a whole uint8 NHWC array, bit for bit as torchvision."""
  x = images_uint8.astype(np.float32) / np.float32(255)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# ---------------------------------------------------------------------------- sources

# config.data.name: name -> function (config.data, seed) -> (train Split, test Split).
DATASETS = Registry('dataset', 'config.data.name')


def load(data: ml_collections.ConfigDict, seed: int = 0) -> tuple[Split, Split]:
  """(train, test) splits for config.data; UsageError when the data is unavailable.

  With data.train_subset / data.test_subset > 0, only that many images of the split,
  class-balanced (`balanced_subset`): the same images in every run and on every host.
  """
  train, test = _load_source(data, seed)
  return (balanced_subset(train, data.get('train_subset', 0), 'data.train_subset'),
          balanced_subset(test, data.get('test_subset', 0), 'data.test_subset'))


def balanced_subset(split: Split, num_images: int, field: str = 'num_images',
                    seed: int = SUBSET_SEED) -> Split:
  """`num_images` images of `split` (all of it for 0), as many of each class as can be.

  Each class gives num_images // num_classes images, the first num_images % num_classes
  classes one more, chosen within the class by a permutation seeded with (seed, class):
  a pure function of the split and the sizes. The subset keeps the split's order.
  """
  if not num_images:
    return split
  num_classes = len(split.classes)
  if not 0 < num_images <= len(split):
    raise UsageError(f'{field}={num_images} must be between 1 and the split\'s {len(split)} '
                     f'images (0: all)')
  chosen = np.zeros(len(split), bool)
  for label in range(num_classes):
    wanted = num_images // num_classes + int(label < num_images % num_classes)
    members = np.flatnonzero(split.labels == label)
    if wanted > len(members):
      raise UsageError(f'{field}={num_images}: class {split.classes[label]!r} has '
                       f'{len(members)} images, a balanced subset needs {wanted}')
    chosen[np.random.default_rng([seed, label]).permutation(members)[:wanted]] = True
  return Split(split.images[chosen], split.labels[chosen], split.classes)


def _load_source(data: ml_collections.ConfigDict, seed: int) -> tuple[Split, Split]:
  return DATASETS.get(data.name)(data, seed)


@DATASETS.register('cifar10')
def _cifar10(data: ml_collections.ConfigDict, seed: int) -> tuple[Split, Split]:
  del seed
  return _load_cifar10(os.path.expanduser(data.root), data.download)


@DATASETS.register('imagefolder')
def _imagefolder(data: ml_collections.ConfigDict, seed: int) -> tuple[Split, Split]:
  del seed
  root = os.path.expanduser(data.root)
  train = _load_imagefolder(os.path.join(root, 'train'), data.image_size)
  test = _load_imagefolder(os.path.join(root, 'test'), data.image_size)
  if list(train.classes) != list(test.classes):
    raise UsageError(f'{root}: train and test have different class folders')
  return train, test


@DATASETS.register('synthetic')
def _synthetic(data: ml_collections.ConfigDict, seed: int) -> tuple[Split, Split]:
  return synthetic(data.synthetic_train_size, data.synthetic_test_size,
                   image_size=data.image_size, seed=seed)


def hold_out(train: Split, num_images: int, seed: int) -> tuple[Split, Split]:
  """(rest, held out): `num_images` training images chosen by a seeded permutation.

  Both keep the training set's order; the choice depends on `seed` and the split's
  size only, so it is the same on every host and in every run.
  """
  if not 0 < num_images < len(train):
    raise UsageError(f'data.holdout={num_images} must be between 1 and {len(train) - 1} '
                     f'(the training set has {len(train)} images)')
  chosen = np.zeros(len(train), bool)
  chosen[np.random.default_rng(seed).permutation(len(train))[:num_images]] = True

  def take(mask):
    return Split(train.images[mask], train.labels[mask], train.classes)

  return take(~chosen), take(chosen)


def evaluation_split(data: ml_collections.ConfigDict, train: Split, test: Split
                     ) -> tuple[Split, Split, str]:
  """(train, evaluation split, its name) for config.data.

  With data.holdout > 0, that many training images are held out (hold_out) and evaluated
  instead of the test set, which the run then never reads: the split to make choices
  on (epochs, schedules) without looking at test accuracy. Otherwise the test set.
  """
  if data.holdout:
    rest, held = hold_out(train, data.holdout, data.holdout_seed)
    return rest, held, 'holdout'
  return train, test, 'test'


def _load_cifar10(root: str, download: bool) -> tuple[Split, Split]:
  import torchvision
  splits = []
  for train in (True, False):
    try:
      ds = torchvision.datasets.CIFAR10(root, train=train, download=download)
    except Exception as e:  # offline (URLError), corrupt, or absent with download=False
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      how = 'could not be downloaded' if download else 'is not there (data.download=False)'
      raise UsageError(
          f'CIFAR-10 not found under {root} and {how} ({reason}). Supply it: put '
          f'cifar-10-batches-py/ (from cifar-10-python.tar.gz) in {root}, or pass '
          f'--config.data.name=imagefolder --config.data.root=DIR for a DIR holding '
          f'train/<class>/*.png and test/<class>/*.png') from None
    splits.append(Split(np.asarray(ds.data, np.uint8), np.asarray(ds.targets, np.int64),
                        tuple(ds.classes)))
  return splits[0], splits[1]


# The image files jaxres reads (image folders, jaxres.predict's folders):
# torchvision.datasets.ImageFolder's extensions (IMG_EXTENSIONS), in any case.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def is_image_file(name: str) -> bool:
  """Whether a file name has one of IMAGE_EXTENSIONS."""
  return name.lower().endswith(IMAGE_EXTENSIONS)


def image_files(root: str) -> tuple[list, list, tuple]:
  """(paths, labels, classes) of ROOT/<class>/**/<image>, in torchvision ImageFolder's
  order: classes sorted, files sorted within each class (walked like os.walk, links
  followed). Found here rather than by ImageFolder so that loading images does not
  import torch (seconds of a fast run's start-up)."""
  if not os.path.isdir(root):
    raise UsageError(f'image folder {root} does not exist (expected {root}/<class>/<image>)')
  classes = tuple(sorted(e.name for e in os.scandir(root) if e.is_dir()))
  if not classes:
    raise UsageError(f'image folder {root}: no class folders (expected {root}/<class>/<image>)')
  paths, labels = [], []
  for label, name in enumerate(classes):
    found = [os.path.join(d, f)
             for d, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True))
             for f in sorted(files) if is_image_file(f)]
    if not found:
      raise UsageError(f'image folder {root}: no images in class folder {name} '
                       f'(extensions {", ".join(IMAGE_EXTENSIONS)})')
    paths += found
    labels += [label] * len(found)
  return paths, labels, classes


def read_image_files(paths: Sequence[str], image_size: int) -> np.ndarray:
  """uint8 RGB images (N, image_size, image_size, 3) of the image files `paths`, read as
  torchvision ImageFolder's loader reads them (PIL, converted to RGB); UsageError naming
  a file that cannot be read or has another size."""
  from PIL import Image
  images = np.empty((len(paths), image_size, image_size, 3), np.uint8)
  # One thread: for 32x32 images Python's per-file work, which holds the GIL, is most of
  # the time, and a second thread only contends for it.
  for i, path in enumerate(paths):
    try:
      with open(path, 'rb') as f:
        img = np.asarray(Image.open(f).convert('RGB'))  # ImageFolder's loader
    except Exception as e:
      raise UsageError(f'cannot read image {path}: {e}') from None
    if img.shape != images.shape[1:]:
      raise UsageError(f'{path} is {img.shape[1]}x{img.shape[0]}; every image must be '
                       f'{image_size}x{image_size} (data.image_size)')
    images[i] = img
  return images


def _load_imagefolder(root: str, image_size: int) -> Split:
  paths, labels, classes = image_files(root)
  return Split(read_image_files(paths, image_size), np.asarray(labels, np.int64), classes)


def synthetic(train_size: int, test_size: int, image_size: int = 32, num_classes: int = 10,
              seed: int = 0) -> tuple[Split, Split]:
  """A learnable toy dataset: each class is a colored grating plus noise.

  Class c has its own color, orientation and frequency; samples add a random phase and
  Gaussian noise, so a small convnet learns it in a few epochs but not in one step.
  """
  if train_size <= 0 or test_size <= 0:
    raise UsageError('synthetic data needs data.synthetic_train_size and '
                     'data.synthetic_test_size > 0')
  rng = np.random.default_rng([seed, 1234])
  colors = rng.uniform(0.25, 0.75, (num_classes, 3))
  angles = rng.permutation(num_classes) * np.pi / num_classes
  freqs = rng.uniform(0.25, 0.6, num_classes)
  yy, xx = np.mgrid[:image_size, :image_size].astype(np.float32)

  def make(n, split_seed):
    r = np.random.default_rng([seed, split_seed])
    labels = np.arange(n) % num_classes
    r.shuffle(labels)
    phase = r.uniform(0, 2 * np.pi, n)[:, None, None]
    a = angles[labels][:, None, None]
    wave = np.sin(freqs[labels][:, None, None] * (xx * np.cos(a) + yy * np.sin(a)) + phase)
    img = colors[labels][:, None, None, :] + 0.2 * wave[..., None]
    img = img + r.normal(0, 0.15, img.shape)
    return Split((np.clip(img, 0, 1) * 255).astype(np.uint8), labels.astype(np.int64),
                 tuple(f'class{i}' for i in range(num_classes)))

  return make(train_size, 1), make(test_size, 2)


# ---------------------------------------------------------------------------- batching

def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """The order of examples in `epoch`: a pure function of (seed, epoch)."""
  if not shuffle:
    return np.arange(num_examples)
  return np.random.default_rng([seed, epoch, 0]).permutation(num_examples)


def sample_seeds(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """One augmentation seed per position in `epoch`: a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch, 1]).integers(0, 2**62, num_examples)


class _TransformedDataset:
  """Map-style torch dataset over a Split: item (index, seed) -> (tensor CHW, label)."""

  def __init__(self, split: Split, transform):
    self.images, self.labels, self.transform = split.images, split.labels, transform

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, item):
    import torch
    from PIL import Image
    index, seed = item
    if seed >= 0:
      torch.default_generator.manual_seed(int(seed))
    return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


class _BatchSampler:
  """Yields lists of (index, seed) for the current epoch's batches (main process)."""

  def __init__(self, loader: 'Loader'):
    self.loader = loader
    self.epoch, self.start_step = 0, 0

  def __len__(self):
    return self.loader.num_batches - self.start_step

  def __iter__(self):
    for step in range(self.start_step, self.loader.num_batches):
      yield self.loader.batch_items(self.epoch, step)


def _collate(samples):
  images = np.stack([s[0].numpy() for s in samples]).transpose(0, 2, 3, 1)
  labels = np.asarray([s[1] for s in samples], np.int32)
  return {'image': np.ascontiguousarray(images), 'label': labels}


@dataclasses.dataclass
class Loader:
  """Batches of one split, optionally shuffled and augmented, for one process.

  The global batch `batch_size` is the unit of order; process p of P gets rows
  [p*B/P, (p+1)*B/P) of each global batch. The last, partial batch is kept (as the
  seed's DataLoader does) unless drop_last; on several devices it is trimmed to a
  multiple of the device count (`multiple_of`). With pad_to_full (evaluation), every
  batch is padded to batch_size rounded up to a multiple of `multiple_of` and carries a
  'mask' of its real rows, so any eval batch size works on any number of devices.
  """

  split: Split
  batch_size: int
  transform: object
  seed: int = 0
  shuffle: bool = False
  augment_seeds: bool = False
  drop_last: bool = False
  pad_to_full: bool = False
  num_workers: int = 0
  process_index: int = 0
  process_count: int = 1
  multiple_of: int = 1  # a partial batch is trimmed to a multiple of this (device count)
  mean: tuple = MEAN  # normalization of the transform=None path
  std: tuple = STD
  _torch_loader: Optional[object] = dataclasses.field(default=None, init=False, repr=False)
  _plan_cache: tuple = dataclasses.field(default=(None, None), init=False, repr=False)

  def __post_init__(self):
    if self.pad_to_full:
      return
    if self.batch_size % self.process_count:
      raise UsageError(f'batch size {self.batch_size} does not split over '
                       f'{self.process_count} processes')

  @property
  def num_batches(self) -> int:
    full, rest = divmod(len(self.split), self.batch_size)
    keep_rest = not self.drop_last and (self.pad_to_full or rest >= self.multiple_of)
    return full + int(keep_rest and rest > 0)

  def global_rows(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(example indices, augmentation seeds) of global batch `step` of `epoch`."""
    order, seeds = self._plan(epoch)
    window = slice(step * self.batch_size, (step + 1) * self.batch_size)
    rows, seeds = order[window], seeds[window]
    if not self.pad_to_full:
      usable = len(rows) - len(rows) % self.multiple_of
      rows, seeds = rows[:usable], seeds[:usable]
    return rows, seeds

  def local_slice(self, num_rows: int) -> slice:
    """This process's share of a global batch of `num_rows` rows."""
    per_process = -(-num_rows // self.process_count)
    return slice(self.process_index * per_process, (self.process_index + 1) * per_process)

  def batch_items(self, epoch: int, step: int) -> list:
    """This process's (index, seed) items of global batch `step` of `epoch`."""
    rows, seeds = self.global_rows(epoch, step)
    local = self.local_slice(len(rows))
    return list(zip(rows[local].tolist(), seeds[local].tolist()))

  def _plan(self, epoch):
    """(order, per-position augmentation seeds) of `epoch`, computed once per epoch."""
    if self._plan_cache[0] != epoch:
      n = len(self.split)
      seeds = (sample_seeds(n, self.seed, epoch) if self.augment_seeds
               else np.full(n, -1, np.int64))
      self._plan_cache = (epoch, (epoch_order(n, self.seed, epoch, self.shuffle), seeds))
    return self._plan_cache[1]

  def _loader(self):
    if self._torch_loader is None:
      import torch.utils.data
      self._sampler = _BatchSampler(self)
      self._torch_loader = torch.utils.data.DataLoader(
          _TransformedDataset(self.split, self.transform), batch_sampler=self._sampler,
          num_workers=self.num_workers, collate_fn=_collate,
          persistent_workers=self.num_workers > 0,
          multiprocessing_context='spawn' if self.num_workers > 0 else None,
          prefetch_factor=PREFETCH_FACTOR if self.num_workers > 0 else None)
    return self._torch_loader

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    """Numpy batches {'image': float32 NHWC, 'label': int32[, 'mask']} of one epoch.

    With transform=None the batches are normalized whole in numpy (bit for bit what
    ToTensor + Normalize give, without a DataLoader); otherwise each image goes through
    the torchvision transform in DataLoader workers.
    """
    if self.transform is None:
      batches = (self._plain_batch(epoch, step) for step in range(start_step, self.num_batches))
    else:
      loader = self._loader()
      self._sampler.epoch, self._sampler.start_step = epoch, start_step
      batches = iter(loader)
    padded = -(-self.batch_size // self.multiple_of) * self.multiple_of
    for batch in batches:  # every eval batch has the same shape and a mask: one compile
      yield pad_batch(batch, padded // self.process_count) if self.pad_to_full else batch

  def _plain_batch(self, epoch: int, step: int) -> dict:
    rows, _ = self.global_rows(epoch, step)
    rows = rows[self.local_slice(len(rows))]
    return {'image': normalize(self.split.images[rows], self.mean, self.std),
            'label': self.split.labels[rows].astype(np.int32)}


def pad_batch(batch: dict, size: int) -> dict:
  """Pad a batch with zeros to `size` rows; 'mask' marks the real rows."""
  n = len(batch['label'])
  mask = batch.get('mask', np.ones(n, np.float32))
  out = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
         for k, v in batch.items() if k != 'mask'}
  out['mask'] = np.concatenate([mask, np.zeros(size - n, np.float32)])
  return out


def train_loader(train: Split, config: ml_collections.ConfigDict, process_index=0,
                 process_count=1, num_devices=1) -> Loader:
  return Loader(train, config.batch_size, train_transform(config.data.augment,
                                                          config.data.image_size,
                                                          config.data.mean, config.data.std),
                seed=config.seed, shuffle=True, augment_seeds=True,
                drop_last=config.data.drop_last, num_workers=config.data.num_workers,
                process_index=process_index, process_count=process_count,
                multiple_of=num_devices)


def eval_loader(test: Split, config: ml_collections.ConfigDict, process_index=0,
                process_count=1, num_devices=1) -> Loader:
  # ToTensor + Normalize (the seed's test transform) done whole in numpy: bit-identical.
  return Loader(test, config.eval_batch_size, None, seed=config.seed,
                pad_to_full=True, num_workers=config.data.num_workers,
                process_index=process_index, process_count=process_count,
                multiple_of=num_devices, mean=tuple(config.data.mean),
                std=tuple(config.data.std))
