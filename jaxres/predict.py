"""Label unlabeled images with a trained run, or with an ensemble of runs.

    python -m jaxres.predict --workdir DIR --input PATH --output preds.csv [--step best]
    python -m jaxres.predict --workdir DIR1 --workdir DIR2 --input PATH --output preds.csv \\
        --probabilities probs.csv

PATH is one of:
  - a pickle like the Kaggle test files of the seed's course: a dict whose 'data' (bytes
    or str key) holds the images, with the IDs in 'ids' if present (else 0..N-1);
  - an .npy array of the images (IDs 0..N-1);
  - a folder of images (PNG, JPEG, or any of input_pipeline.IMAGE_EXTENSIONS; sorted by
    name; the ID is the file name without its extension).
Pickle and .npy images are uint8 arrays in one of three layouts: N x 32 x 32 x 3 (height,
width, channel), N x 3 x 32 x 32 (channel-major), or N x 3072 rows. A row does not say
its order; --layout says it: chw (CIFAR-10's batches: the 1024 red values, then green,
then blue; what `auto` assumes) or hwc (pixel after pixel, RGB interleaved).

Each run normalizes the images as it was trained and applies its own test-time
augmentation; an ensemble averages the runs' class probabilities (softmax outputs). The
CSV has the header `ID,Labels`, as the seed wrote it, with numeric class labels;
--probabilities also writes every image's class probabilities (`ID,0,1,...`).
"""

import io
import os
import pickle

from absl import flags
import jax
import numpy as np

from jaxres import checkpoints, cli, evaluation, input_pipeline, parallel
from jaxres.errors import UsageError


LAYOUTS = ('auto', 'chw', 'hwc')


class _DataOnlyUnpickler(pickle.Unpickler):
  """Unpickles dicts, lists, bytes, numbers and numpy arrays; refuses any other object."""

  ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
             ('numpy', 'ndarray'), ('numpy', 'dtype'), ('collections', 'OrderedDict')}

  def find_class(self, module, name):
    if (module, name) in self.ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f'refusing to load {module}.{name} from a data pickle')


def decode_images(array, layout: str = 'auto', size: int = 32, source: str = 'input') -> np.ndarray:
  """uint8 NHWC images from `array` in any of the layouts the module docstring lists.

  N x size x size x 3 and N x 3 x size x size are read by their shape (an explicit
  `layout` must agree); rows of 3 * size * size values are channel-major (chw, CIFAR's
  batches) unless `layout` is 'hwc'. UsageError names `source` and the accepted shapes.
  """
  if layout not in LAYOUTS:
    raise UsageError(f'--layout must be one of {", ".join(LAYOUTS)}, got {layout!r}')
  images = np.asarray(array)
  hwc, chw = (size, size, 3), (3, size, size)
  if images.ndim == 2 and images.shape[1] == 3 * size * size:
    images = images.reshape((-1,) + (hwc if layout == 'hwc' else chw))
  elif images.ndim == 4 and images.shape[1:] in (hwc, chw):
    found = 'hwc' if images.shape[1:] == hwc else 'chw'
    if layout not in ('auto', found):
      raise UsageError(f'{source}: images of shape {images.shape} are {found}, not --layout {layout}')
  else:
    raise UsageError(f'{source}: expected uint8 images of shape N x {3 * size * size}, '
                     f'N x {size} x {size} x 3 or N x 3 x {size} x {size}, got shape {images.shape}')
  if images.dtype != np.uint8:
    raise UsageError(f'{source}: expected uint8 pixels, got {images.dtype}')
  if not len(images):
    raise UsageError(f'{source}: no images')
  return images if images.shape[1:] == hwc else images.transpose(0, 2, 3, 1)


def _field(data: dict, name: str):
  """data[b'name'] or data['name'] (pickles from Python 2 have bytes keys), else None."""
  for key in (name.encode(), name):
    if key in data:
      return data[key]
  return None


def _ids(ids, count: int, source: str) -> list:
  """The IDs of a pickle's 'ids' (integers or strings), or 0..count-1 if it has none."""
  if ids is None:
    return list(range(count))
  ids = np.asarray(ids)
  if ids.shape != (count,) or ids.dtype.kind not in 'iuSUO':
    raise UsageError(f"{source}: 'ids' must be {count} integers or strings (one per image), "
                     f'got {ids.dtype} of shape {ids.shape}')
  return [i.decode() if isinstance(i, bytes) else i for i in ids.tolist()]


def _read_folder(path: str, size: int) -> tuple[list, np.ndarray]:
  names = sorted(n for n in os.listdir(path) if input_pipeline.is_image_file(n))
  if not names:
    raise UsageError(f'{path}: no images in this folder '
                     f'(extensions {", ".join(input_pipeline.IMAGE_EXTENSIONS)})')
  images = input_pipeline.read_image_files([os.path.join(path, n) for n in names], size)
  return [os.path.splitext(n)[0] for n in names], images


def read_images(path: str, size: int = 32, layout: str = 'auto') -> tuple[list, np.ndarray]:
  """(ids, uint8 NHWC images) from a pickle, an .npy file or a folder of images;
  `layout` (LAYOUTS) as decode_images', for pickles and .npy files."""
  if os.path.isdir(path):
    if layout != 'auto':
      raise UsageError(f'--layout applies to pickle and .npy inputs, not to a folder ({path})')
    return _read_folder(path, size)
  if not os.path.isfile(path):
    raise UsageError(f'--input {path} does not exist')
  if path.endswith('.npy'):
    try:
      array = np.load(path, allow_pickle=False)
    except Exception as e:  # pylint: disable=broad-except
      raise UsageError(f'cannot read {path} as .npy: {e}') from None
    images = decode_images(array, layout, size, path)
    return list(range(len(images))), images
  try:
    with open(path, 'rb') as f:
      data = _DataOnlyUnpickler(io.BytesIO(f.read()), encoding='bytes').load()
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f'cannot read {path} as a CIFAR-style pickle: {e}') from None
  if not isinstance(data, dict) or _field(data, 'data') is None:
    raise UsageError(f"{path}: expected a dict with the images under b'data' or 'data'")
  images = decode_images(_field(data, 'data'), layout, size, path)
  return _ids(_field(data, 'ids'), len(images), path), images


def predict_probabilities(model, state, images: np.ndarray, batch_size: int,
                          mean=input_pipeline.MEAN, std=input_pipeline.STD, tta: str = 'none',
                          **tta_kwargs) -> np.ndarray:
  """Class probabilities (N, classes) of uint8 NHWC images (eval mode, the run's
  normalization; `tta`, `tta_kwargs` as evaluation.tta_logits')."""
  forward = jax.jit(lambda variables, x: evaluation.tta_probabilities(model, variables, x, tta,
                                                                      **tta_kwargs))
  out = []
  for i in range(0, len(images), batch_size):
    x = input_pipeline.normalize(images[i:i + batch_size], mean, std)
    out.append(np.asarray(jax.device_get(forward(state.variables, x))))
  return np.concatenate(out)


def _write_lines(path: str, lines):
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.writelines(f'{line}\n' for line in lines)
  os.replace(tmp, path)


def write_csv(path: str, ids, labels):
  """The submission: `ID,Labels`, one row per image."""
  _write_lines(path, ['ID,Labels'] + [f'{i},{int(label)}' for i, label in zip(ids, labels)])


def write_probabilities(path: str, ids, probabilities: np.ndarray):
  """`ID,0,1,...`: each image's probability of each class."""
  header = ','.join(['ID'] + [str(c) for c in range(probabilities.shape[1])])
  _write_lines(path, [header] + [f'{i},' + ','.join(f'{p:.6f}' for p in row)
                                 for i, row in zip(ids, probabilities)])


def _check_writable(path: str, flag: str):
  directory = os.path.dirname(os.path.abspath(path))
  if not os.access(directory, os.W_OK):
    raise UsageError(f'cannot write --{flag} {path}: {directory} is not writable')


def ensemble_probabilities(workdirs, which: str, input_path: str, layout: str, batch_size: int,
                           mesh) -> tuple[list, np.ndarray, list]:
  """(ids, class probabilities averaged over the runs in `workdirs`, the checkpoint step of
  each run) of the images in `input_path`; each run at checkpoint `which` (latest, best or
  a step), with its own normalization and test-time augmentation."""
  ids, images, size, probabilities, used = None, None, None, [], []
  for workdir in workdirs:
    config, model, state, step = checkpoints.load_run(workdir, which, mesh)
    if images is None:
      size = config.data.image_size
      ids, images = read_images(input_path, size, layout)
    elif config.data.image_size != size:
      raise UsageError(f'{workdir} takes {config.data.image_size}x{config.data.image_size} '
                       f'images, {workdirs[0]} {size}x{size}: an ensemble needs one size')
    probabilities.append(predict_probabilities(
        model, state, images, batch_size, tuple(config.data.mean), tuple(config.data.std),
        **evaluation.tta_options(config)))
    used.append(step)
  return ids, evaluation.average_probabilities(probabilities, workdirs), used


def command():
  """The command-line entry point: defines the flags (only then, so that importing this
  module as a library defines none) and returns main(argv)."""
  workdir_flag = flags.DEFINE_multi_string(
      'workdir', None, 'A jaxres run directory; repeat it to predict with an ensemble of runs '
      '(the mean of their class probabilities).')
  step_flag = flags.DEFINE_string('step', 'best',
                                  'Checkpoint: latest, best or a step number (of every run).')
  input_flag = flags.DEFINE_string('input', None,
                                   'Images: a CIFAR-style pickle, an .npy or a folder.')
  layout_flag = flags.DEFINE_enum(
      'layout', 'auto', list(LAYOUTS),
      'Pixel order of N x 3072 rows in a pickle or .npy: chw (channel-major, CIFAR\'s '
      'batches) or hwc (RGB interleaved); auto = chw. N x 32 x 32 x 3 and N x 3 x 32 x 32 '
      'arrays are read by their shape.')
  output_flag = flags.DEFINE_string('output', 'predictions.csv', 'CSV file to write.')
  probabilities_flag = flags.DEFINE_string(
      'probabilities', None, 'Also write each image\'s class probabilities to this CSV.')
  batch_flag = flags.DEFINE_integer('batch_size', 500, 'Images per forward pass.')

  def main(argv):
    if len(argv) > 1:
      raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    if not workdir_flag.value or not input_flag.value:
      raise UsageError('--workdir and --input are required')
    if batch_flag.value <= 0:
      raise UsageError('--batch_size must be positive')
    _check_writable(output_flag.value, 'output')
    if probabilities_flag.value:
      _check_writable(probabilities_flag.value, 'probabilities')
    workdirs = workdir_flag.value
    ids, probabilities, used = ensemble_probabilities(
        workdirs, step_flag.value, input_flag.value, layout_flag.value, batch_flag.value,
        parallel.make_mesh())
    labels = probabilities.argmax(axis=1)
    write_csv(output_flag.value, ids, labels)
    if probabilities_flag.value:
      write_probabilities(probabilities_flag.value, ids, probabilities)
    if len(workdirs) == 1:
      source = f'checkpoint {used[0]}'
    else:
      source = f'an ensemble of {len(workdirs)} runs: ' + ', '.join(
          f'{w} checkpoint {s}' for w, s in zip(workdirs, used))
    print(f'wrote {len(labels)} predictions to {output_flag.value} ({source})')
    if probabilities_flag.value:
      print(f'wrote their class probabilities to {probabilities_flag.value}')

  return main


if __name__ == '__main__':
  cli.run(command())
