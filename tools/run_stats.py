"""Statistics over runs of several seeds: per-epoch spread, plateau cuts, Welch's t interval.

Pure functions of metrics.jsonl records (jaxres.train's schema); no framework involved.
"""

import math
from typing import Sequence

import numpy as np

METRICS = ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy', 'learning_rate')
CONFIDENCE = 0.95


# ---------------------------------------------------------------------------- Student's t

def _beta_fraction(a: float, b: float, x: float) -> float:
  """The continued fraction of the incomplete beta function (modified Lentz)."""
  tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
  d = 1 / (d if abs(d) > tiny else tiny)
  result = d
  for m in range(1, 1000):
    for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                      -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
      d = 1 + numerator * d
      d = 1 / (d if abs(d) > tiny else tiny)
      c = 1 + numerator / c
      c = c if abs(c) > tiny else tiny
      result *= c * d
    if abs(c * d - 1) < 1e-15:
      break
  return result


def regularized_beta(x: float, a: float, b: float) -> float:
  """I_x(a, b), the regularized incomplete beta function, for 0 <= x <= 1."""
  if x <= 0 or x >= 1:
    return float(x >= 1)
  front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                   + a * math.log(x) + b * math.log1p(-x))
  if x < (a + 1) / (a + b + 2):
    return front * _beta_fraction(a, b, x) / a
  return 1 - front * _beta_fraction(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
  """P(T <= t) for Student's t with `df` (real, > 0) degrees of freedom."""
  tail = 0.5 * regularized_beta(df / (df + t * t), df / 2, 0.5)
  return 1 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
  """The t with t_cdf(t, df) = p (bisection: monotone, exact to ~1e-12)."""
  if not 0 < p < 1:
    raise ValueError(f'p must be in (0, 1), got {p}')
  if p < 0.5:
    return -t_quantile(1 - p, df)
  low, high = 0.0, 1.0
  while t_cdf(high, df) < p:
    low, high = high, 2 * high
  for _ in range(200):
    middle = (low + high) / 2
    low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    if high - low < 1e-13 * max(1.0, high):
      break
  return (low + high) / 2


def welch_interval(ours: Sequence[float], theirs: Sequence[float],
                   confidence: float = CONFIDENCE) -> dict:
  """Welch's t interval for mean(ours) - mean(theirs): {difference, low, high, df, se}.

  Needs two values or more on each side. Where both sides have no spread at all, the
  interval is the difference itself (df: n1 + n2 - 2).
  """
  a, b = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  if len(a) < 2 or len(b) < 2:
    raise ValueError(f'Welch\'s interval needs 2 values or more on each side, got '
                     f'{len(a)} and {len(b)}')
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  se = math.sqrt(va + vb)
  difference = float(a.mean() - b.mean())
  if se == 0:
    return {'difference': difference, 'low': difference, 'high': difference,
            'df': float(len(a) + len(b) - 2), 'se': 0.0}
  df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  half = t_quantile(0.5 + confidence / 2, df) * se
  return {'difference': difference, 'low': difference - half, 'high': difference + half,
          'df': float(df), 'se': se}


# ---------------------------------------------------------------------------- runs

def spread(values: Sequence[float]) -> dict:
  """{mean, std (n - 1; 0 for one value), n, min, max} of `values`."""
  v = np.asarray(values, np.float64)
  return {'mean': float(v.mean()), 'std': float(v.std(ddof=1)) if len(v) > 1 else 0.0,
          'n': len(v), 'min': float(v.min()), 'max': float(v.max())}


def per_epoch(runs: Sequence[list], num_epochs: int, metrics=METRICS) -> list:
  """[{epoch, metric: spread over the runs}] for epochs 1..num_epochs (every run has them)."""
  by_epoch = [{r['epoch']: r for r in records} for records in runs]
  return [{'epoch': epoch, **{m: spread([run[epoch][m] for run in by_epoch]) for m in metrics
                              if all(m in run[epoch] for run in by_epoch)}}
          for epoch in range(1, num_epochs + 1)]


def cut_epochs(records: list) -> list:
  """The epochs that trained at a lower learning rate than the epoch before: where the
  plateau rule (stepped after the previous epoch) cut the rate."""
  return [r['epoch'] for previous, r in zip(records, records[1:])
          if r['learning_rate'] < previous['learning_rate']]


def verdict(interval: dict, name: str = 'test accuracy', unit_digits: int = 4,
            ours: str = 'jaxres', theirs: str = 'PyTorch') -> str:
  """One sentence: the interval contains 0, or `ours` is worse/better by at least X."""
  low, high = interval['low'], interval['high']
  bounds = f'[{low:+.{unit_digits}f}, {high:+.{unit_digits}f}]'
  level = f'{CONFIDENCE:.0%}'.replace('%', ' %')
  if low <= 0 <= high:
    return (f'no difference shown: the {level} interval of {ours} - {theirs} in final {name}, '
            f'{bounds}, contains 0')
  better = 'higher' if low > 0 else 'lower'
  return (f'{ours}\'s final {name} is {better} than {theirs}\'s by at least '
          f'{min(abs(low), abs(high)):.{unit_digits}f} ({level} interval {bounds})')


def final_comparison(ours: list, theirs: list, metric: str,
                     names: tuple = ('ours', 'theirs')) -> dict:
  """The last epoch's `metric` of every run on each side ({name: {values, spread}}) and
  Welch's interval of mean(ours) - mean(theirs) ('welch': None with fewer than 2 runs a
  side)."""
  a = [records[-1][metric] for records in ours]
  b = [records[-1][metric] for records in theirs]
  return {names[0]: {'values': a, **spread(a)}, names[1]: {'values': b, **spread(b)},
          'welch': welch_interval(a, b) if min(len(a), len(b)) >= 2 else None}
