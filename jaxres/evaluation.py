"""Evaluation: test-time views of the images, evaluation over a loader, the report built
from its sums, and ensembles of runs.

Test-time augmentation (config.eval_tta) names a `TTA_MODES` entry: none, flip or
flip_translate (airbench's views); `tta_logits` averages the model's logits over it.
"""

from typing import Callable, Iterable, Sequence

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from jaxres import parallel, reporting
from jaxres.errors import UsageError
from jaxres.registry import Registry

PER_EXAMPLE = 'probabilities'  # the eval output that is gathered, not summed

# ---------------------------------------------------------------------------- test-time views

# airbench's flip-and-translate test-time augmentation: the unshifted pair of views at
# weight 0.5, the pairs shifted one pixel up-left and one down-right at 0.25 each.
AIRBENCH_SHIFTS = ((-1, -1), (1, 1))
AIRBENCH_CENTER_WEIGHT = 0.5

# config.eval_tta: name -> function (forward, images, *, shifts, center_weight) -> logits,
# where forward maps NHWC images to the model's eval-mode logits.
TTA_MODES = Registry('test-time augmentation', 'config.eval_tta')


def shift(images, dy: int, dx: int, mode: str = 'reflect'):
  """out[b, y, x] = images[b, y - dy, x - dx] for static integer shifts: the content of
  every NHWC image moves dy pixels down and dx right, and the uncovered border is mirrored
  (mode='reflect', the speed runs' translation) or zero ('constant')."""
  pad = max(abs(dy), abs(dx))
  if pad == 0:
    return images
  height, width = images.shape[1:3]
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
  return padded[:, pad - dy:pad - dy + height, pad - dx:pad - dx + width]


def _mirrored(forward: Callable, images):
  """The mean logits of the images and their mirror images."""
  return 0.5 * (forward(images) + forward(jnp.flip(images, axis=2)))


@TTA_MODES.register('none')
def _no_views(forward: Callable, images, **_):
  return forward(images)


@TTA_MODES.register('flip')
def _flip(forward: Callable, images, **_):
  return _mirrored(forward, images)


@TTA_MODES.register('flip_translate')
def _flip_translate(forward: Callable, images, *, shifts: Sequence[tuple[int, int]],
                    center_weight: float, **_):
  weight = (1 - center_weight) / len(shifts)
  logits = center_weight * _mirrored(forward, images)
  for dy, dx in shifts:
    logits = logits + weight * _mirrored(forward, shift(images, dy, dx))
  return logits


def tta_options(config) -> dict:
  """tta_logits' keyword arguments from config.eval_tta, eval_tta_shifts and
  eval_tta_center_weight (the latter two absent from configs older than them: defaults)."""
  shifts = config.get('eval_tta_shifts', AIRBENCH_SHIFTS)
  return {'tta': config.eval_tta,
          'shifts': tuple((int(dy), int(dx)) for dy, dx in shifts),
          'center_weight': float(config.get('eval_tta_center_weight', AIRBENCH_CENTER_WEIGHT))}


def tta_logits(model: nn.Module, variables, images, tta: str = 'none',
               shifts: Sequence[tuple[int, int]] = AIRBENCH_SHIFTS,
               center_weight: float = AIRBENCH_CENTER_WEIGHT):
  """Eval-mode logits, averaged over the test-time augmentation `tta` (a TTA_MODES name)
  of NHWC `images`.

  none: the images. flip: the mean of the image and its mirror. flip_translate: the flip
  logits of the image at `center_weight`, plus the flip logits of each of `shifts`
  ((dy, dx): the content moved dy pixels down and dx right, borders reflected, as
  `shift`) sharing the rest equally; the defaults are the airbench speed runs' six views.
  """
  forward = lambda x: model.apply(variables, x, train=False)
  return TTA_MODES.get(tta)(forward, images, shifts=shifts, center_weight=center_weight)


def tta_probabilities(model: nn.Module, variables, images, tta: str = 'none', **tta_kwargs):
  """Class probabilities of NHWC `images`: the softmax of tta_logits' logits (what an
  ensemble of runs averages)."""
  return jax.nn.softmax(tta_logits(model, variables, images, tta, **tta_kwargs), axis=-1)


# ---------------------------------------------------------------------------- evaluation

def evaluate(eval_fn, state, batches: Iterable[dict], sharding) -> dict:
  """Metric sums (numpy float64, confusion matrix included) of `state` over `batches`:
  this process's numpy batches, each with a 'mask' of its real rows (an eval Loader's
  epoch(0), input_pipeline.eval_loader).

  An eval_fn output named PER_EXAMPLE (eval_step's probabilities, on request) is not
  summed: the result holds its rows of real images (mask 1), in the batches' order,
  gathered from every process.
  """
  outputs, masks = [], []
  for local in batches:
    batch = parallel.global_batch(local, sharding)
    outputs.append(eval_fn(state, batch))
    if PER_EXAMPLE in outputs[-1]:
      masks.append(batch['mask'])
  rows = [o.pop(PER_EXAMPLE) for o in outputs if PER_EXAMPLE in o]
  outputs = jax.device_get(outputs)
  sums = {k: np.sum([np.asarray(o[k], np.float64) for o in outputs], axis=0)
          for k in outputs[0]}
  if rows:
    rows, masks = multihost_utils.process_allgather((rows, masks), tiled=True)
    sums[PER_EXAMPLE] = np.concatenate([r[np.asarray(m) > 0] for r, m in zip(rows, masks)])
  return sums


def probability_sums(probabilities: np.ndarray, labels: np.ndarray) -> dict:
  """evaluate()'s sums for class probabilities (N, classes) of N labelled images: the
  cross-entropy of the probabilities, the argmax's hits and the confusion matrix."""
  probabilities = np.asarray(probabilities, np.float64)
  labels = np.asarray(labels)
  predicted = probabilities.argmax(axis=1)
  confusion = np.zeros((probabilities.shape[1],) * 2)
  np.add.at(confusion, (labels, predicted), 1)
  picked = probabilities[np.arange(len(labels)), labels]
  return {'loss_sum': float(-np.log(np.maximum(picked, np.finfo(np.float32).tiny)).sum()),
          'correct': float(np.sum(predicted == labels)), 'count': float(len(labels)),
          'confusion': confusion}


def average_probabilities(probabilities: Sequence[np.ndarray], names: Sequence[str]) -> np.ndarray:
  """The ensemble's class probabilities: the mean of its members' (one (N, classes) array
  per member, named by `names`); UsageError if their shapes differ."""
  shapes = [np.shape(p) for p in probabilities]
  if len(set(shapes)) > 1:
    listed = ', '.join(f'{n}: {s[1]} classes for {s[0]} images' for n, s in zip(names, shapes))
    raise UsageError(f'the runs of an ensemble must predict the same classes ({listed})')
  return np.mean(np.stack(probabilities), axis=0)


def report(sums: dict, classes) -> dict:
  """test_loss, test_accuracy, per_class_accuracy and the confusion matrix."""
  confusion = np.asarray(sums['confusion'])
  per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
  count = max(float(sums['count']), 1.0)
  return {
      'test_loss': float(sums['loss_sum']) / count,
      'test_accuracy': float(sums['correct']) / count,
      'num_examples': int(sums['count']),
      'per_class_accuracy': {str(c): float(a) for c, a in zip(classes, per_class)},
      'confusion_matrix': confusion.astype(int).tolist(),
  }


def format_report(result: dict) -> str:
  """A readable table of a `report` ('Holdout' figures where it has eval_split 'holdout')."""
  classes = list(result['per_class_accuracy'])
  width = max(len(c) for c in classes)
  name = reporting.eval_name(result)
  lines = [f"{name} Loss: {result['test_loss']:.4f}, {name} Acc: {result['test_accuracy']:.4f} "
           f"({result['num_examples']} images)", '', 'per-class accuracy:']
  lines += [f'  {c:<{width}}  {a:.4f}' for c, a in result['per_class_accuracy'].items()]
  lines += ['', 'confusion matrix (rows: true class, columns: predicted):']
  cells = max(len(str(v)) for row in result['confusion_matrix'] for v in row)
  cells = max(cells, 3)
  lines.append(' ' * (width + 2) + ' '.join(f'{i:>{cells}}' for i in range(len(classes))))
  for c, row in zip(classes, result['confusion_matrix']):
    lines.append(f'  {c:<{width}}' + ' '.join(f'{v:>{cells}}' for v in row))
  return '\n'.join(lines)


def format_ensemble(result: dict) -> str:
  """An ensemble's report (eval.run_ensemble's): each member's loss and accuracy and the
  ensemble's in one table, then the ensemble's per-class accuracy and confusion matrix."""
  members = result['members']
  name = reporting.eval_name(result)
  width = max(len('ensemble'), *(len(m['workdir']) for m in members))
  header = f"  {'run':<{width}}  {'checkpoint':>10}  {name + ' Loss':>12}  {name + ' Acc':>11}"
  row = lambda run, step, r: (f"  {run:<{width}}  {step:>10}  {r['test_loss']:>12.4f}  "
                              f"{r['test_accuracy']:>11.4f}")
  lines = [f"ensemble of {len(members)} runs on {result['num_examples']} "
           f"{result.get('eval_split', 'test')} images", header]
  lines += [row(m['workdir'], m['checkpoint'], m) for m in members]
  lines += [row('ensemble', '', result), '', 'ensemble:', format_report(result)]
  return '\n'.join(lines)
