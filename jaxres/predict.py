"""Label unlabeled images with a trained run.

    python -m jaxres.predict --workdir DIR --input PATH --output preds.csv [--step best]

PATH is one of:
  - a pickle like the seed's Kaggle test file: a dict whose b'data' is N x 3072 uint8
    rows, channel-major like CIFAR-10's batches (b'ids' gives the IDs if present);
  - an .npy array of N x 32 x 32 x 3 uint8;
  - a folder of PNG/JPEG images (sorted by name; the ID is the file name without its
    extension).
The CSV has the header `ID,Labels`, as the seed wrote it, with numeric class labels.
"""

import io
import os
import pickle

from absl import flags
import jax
import numpy as np

from jaxres import checkpoints, cli, input_pipeline, parallel, steps
from jaxres.errors import UsageError


IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


class _DataOnlyUnpickler(pickle.Unpickler):
  """Unpickles dicts, lists, bytes, numbers and numpy arrays; refuses any other object."""

  ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
             ('numpy', 'ndarray'), ('numpy', 'dtype'), ('collections', 'OrderedDict')}

  def find_class(self, module, name):
    if (module, name) in self.ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f'refusing to load {module}.{name} from a data pickle')


def _check_images(images, source: str, size: int) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise UsageError(f'{source}: expected uint8 pixels, got {images.dtype}')
  if images.ndim != 4 or images.shape[1:] != (size, size, 3):
    raise UsageError(f'{source}: expected N x {size} x {size} x 3 images, got shape {images.shape}')
  return images


def read_images(path: str, size: int = 32) -> tuple[list, np.ndarray]:
  """(ids, uint8 NHWC images) from a pickle, an .npy file or a folder of images."""
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
      raise UsageError(f'{path}: no .png/.jpg/.jpeg images in this folder')
    from PIL import Image
    images = []
    for name in names:
      try:
        with Image.open(os.path.join(path, name)) as img:
          images.append(np.asarray(img.convert('RGB')))
      except Exception as e:  # pylint: disable=broad-except
        raise UsageError(f'cannot read image {os.path.join(path, name)}: {e}') from None
      if images[-1].shape != (size, size, 3):
        raise UsageError(f'{os.path.join(path, name)} is {images[-1].shape[1]}x'
                         f'{images[-1].shape[0]}; expected {size}x{size}')
    return [os.path.splitext(n)[0] for n in names], _check_images(np.stack(images), path, size)
  if not os.path.isfile(path):
    raise UsageError(f'--input {path} does not exist')
  if path.endswith('.npy'):
    try:
      images = np.load(path, allow_pickle=False)
    except Exception as e:  # pylint: disable=broad-except
      raise UsageError(f'cannot read {path} as .npy: {e}') from None
    images = _check_images(images, path, size)
    return list(range(len(images))), images
  try:
    with open(path, 'rb') as f:
      data = _DataOnlyUnpickler(io.BytesIO(f.read()), encoding='bytes').load()
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f'cannot read {path} as a CIFAR-style pickle: {e}') from None
  if not isinstance(data, dict) or b'data' not in data:
    raise UsageError(f"{path}: expected a dict with b'data' (N x 3072 uint8 rows)")
  rows = np.asarray(data[b'data'])
  if rows.ndim != 2 or rows.shape[1] != 3 * size * size:
    raise UsageError(f"{path}: b'data' must be N x {3 * size * size}, got shape {rows.shape}")
  images = _check_images(rows.reshape(-1, 3, size, size).transpose(0, 2, 3, 1), path, size)
  ids = data.get(b'ids')
  ids = list(range(len(images))) if ids is None else [int(i) for i in np.asarray(ids)]
  return ids, images


def predict_labels(model, state, images: np.ndarray, batch_size: int,
                   mean=input_pipeline.MEAN, std=input_pipeline.STD, tta: str = 'none',
                   **tta_kwargs) -> np.ndarray:
  """Predicted class of each uint8 NHWC image (eval mode, the run's normalization;
  `tta`, `tta_kwargs` as steps.tta_logits')."""
  forward = jax.jit(lambda variables, x: steps.tta_logits(model, variables, x, tta, **tta_kwargs))
  labels = []
  for i in range(0, len(images), batch_size):
    x = input_pipeline.normalize(images[i:i + batch_size], mean, std)
    labels.append(np.asarray(jax.device_get(jax.numpy.argmax(forward(state.variables, x), -1))))
  return np.concatenate(labels)


def write_csv(path: str, ids, labels):
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write('ID,Labels\n')
    for i, label in zip(ids, labels):
      f.write(f'{i},{int(label)}\n')
  os.replace(tmp, path)


def command():
  """The command-line entry point: defines the flags (only then, so that importing this
  module as a library defines none) and returns main(argv)."""
  workdir_flag = flags.DEFINE_string('workdir', None, 'A jaxres run directory.')
  step_flag = flags.DEFINE_string('step', 'best', 'Checkpoint: latest, best or a step number.')
  input_flag = flags.DEFINE_string('input', None,
                                   'Images: a CIFAR-style pickle, an .npy or a folder.')
  output_flag = flags.DEFINE_string('output', 'predictions.csv', 'CSV file to write.')
  batch_flag = flags.DEFINE_integer('batch_size', 500, 'Images per forward pass.')

  def main(argv):
    if len(argv) > 1:
      raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    if not workdir_flag.value or not input_flag.value:
      raise UsageError('--workdir and --input are required')
    if batch_flag.value <= 0:
      raise UsageError('--batch_size must be positive')
    out_dir = os.path.dirname(os.path.abspath(output_flag.value))
    if not os.access(out_dir, os.W_OK):
      raise UsageError(f'cannot write {output_flag.value}: {out_dir} is not writable')
    mesh = parallel.make_mesh()
    config, model, state, step = checkpoints.load_run(workdir_flag.value, step_flag.value, mesh)
    ids, images = read_images(input_flag.value, config.data.image_size)
    labels = predict_labels(model, state, images, batch_flag.value, tuple(config.data.mean),
                            tuple(config.data.std), **steps.tta_options(config))
    write_csv(output_flag.value, ids, labels)
    print(f'wrote {len(labels)} predictions to {output_flag.value} (checkpoint {step})')

  return main


if __name__ == '__main__':
  cli.run(command())
