"""Evaluation over a loader and the report built from its sums."""

import jax
import numpy as np

from jaxres import input_pipeline, parallel, reporting


def evaluate(eval_fn, state, loader: input_pipeline.Loader, sharding) -> dict:
  """Metric sums (numpy float64, confusion matrix included) of `state` over `loader`."""
  outputs = [eval_fn(state, parallel.global_batch(b, sharding)) for b in loader.epoch(0)]
  outputs = jax.device_get(outputs)
  return {k: np.sum([np.asarray(o[k], np.float64) for o in outputs], axis=0)
          for k in outputs[0]}


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
