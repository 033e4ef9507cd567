"""What a run tells its user: the per-epoch line, a progress bar, metrics.jsonl, curves.png."""

import json
import os
import sys
import time
from typing import Optional

from jaxres.errors import UsageError

# Fields of a metrics.jsonl record that differ run to run (wall-clock figures).
TIMING_KEYS = ('epoch_seconds', 'images_per_second', 'eval_seconds', 'compile_seconds')
# jax.monitoring's duration events of tracing, lowering and compiling a jitted function
# (a persistent compilation cache hit is counted as its retrieval time).
COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                  '/jax/core/compile/jaxpr_to_mlir_module_duration',
                  '/jax/core/compile/backend_compile_duration')


class CompileClock:
  """Seconds this process spends tracing and compiling, while in its `with` block.

  Compilation happens inside the first call of each jitted function (and again for
  each new argument shape, or a new set of frozen parameters), so an epoch's wall time
  includes it; the trainer reports it apart (compile_seconds) from the epoch's time.
  """

  def __init__(self):
    self.seconds = 0.0

  def _on_event(self, event: str, duration: float, **_):
    if event in COMPILE_EVENTS:
      self.seconds += duration

  def __enter__(self):
    import jax  # pylint: disable=import-outside-toplevel
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    return self

  def __exit__(self, *exc):
    import jax  # pylint: disable=import-outside-toplevel
    jax.monitoring.unregister_event_duration_listener(self._on_event)


def eval_name(record: dict) -> str:
  """'Test', or 'Holdout' for a record whose test_* figures are on held-out training
  images (config.data.holdout)."""
  return record.get('eval_split', 'test').capitalize()


def epoch_line(record: dict, num_epochs: int) -> str:
  """The seed's per-epoch report, plus learning rate, seconds and images/s."""
  r = record
  name = eval_name(r)
  test = (f"{name} Loss: {r['test_loss']:.4f}, {name} Acc: {r['test_accuracy']:.4f}, "
          if 'test_loss' in r else '')
  compiling = (f" (+{r['compile_seconds']:.1f}s compiling)"
               if r.get('compile_seconds', 0) >= 0.05 else '')
  return (f"Epoch [{r['epoch']}/{num_epochs}], Train Loss: {r['train_loss']:.4f}, "
          f"Train Acc: {r['train_accuracy']:.4f}, {test}LR: {r['learning_rate']:.2e}, "
          f"Time: {r['epoch_seconds']:.1f}s{compiling}, {r['images_per_second']:.0f} img/s")


def _atomic_write(path: str, data: bytes):
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_jsonl(path: str) -> list:
  """The values of a JSON-lines file, one a line, in order; [] if there is no file.

  Blank lines are skipped. A last line without its newline that is not JSON was cut
  short by a crash (or is being written): it is dropped. Any other line that is not JSON
  is a UsageError naming the file and the line.
  """
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().split('\n')
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines):  # no newline after it: torn
        break
      raise UsageError(f'{path}, line {number}: not JSON ({e.msg})') from None
  return records


class MetricsLog:
  """A JSON-lines log (DIR/metrics.jsonl: one object per finished epoch), append-only
  except for the records a resume drops, so it never holds duplicates."""

  def __init__(self, path: str):
    self.path = path

  def read(self) -> list[dict]:
    return read_jsonl(self.path)

  def keep_while(self, keep) -> list[dict]:
    """Drop the records for which keep(record) is false (work lost in a crash)."""
    records = [r for r in self.read() if keep(r)]
    _atomic_write(self.path, ''.join(json.dumps(r) + '\n' for r in records).encode())
    return records

  def keep_through(self, epoch: int) -> list[dict]:
    """Drop records after `epoch`; returns those kept."""
    return self.keep_while(lambda r: r['epoch'] <= epoch)

  def append(self, record: dict):
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
      f.flush()
      os.fsync(f.fileno())


class Progress:
  """A one-line progress bar on stderr, shown only on a terminal."""

  def __init__(self, total: int, label: str, enabled: bool = True):
    self.total, self.label = total, label
    self.enabled = enabled and sys.stderr.isatty()
    self.start = time.perf_counter()
    self._last = 0.0

  def update(self, done: int, extra: str = ''):
    now = time.perf_counter()
    if not self.enabled or (now - self._last < 0.2 and done < self.total):
      return
    self._last = now
    width = 30
    filled = int(width * done / max(self.total, 1))
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else 0
    sys.stderr.write(f'\r{self.label} [{"#" * filled}{"." * (width - filled)}] '
                     f'{done}/{self.total} {extra} eta {eta:.0f}s \x1b[K')
    sys.stderr.flush()

  def close(self):
    if self.enabled:
      sys.stderr.write('\r\x1b[K')
      sys.stderr.flush()


def plot_curves(records: list[dict], path: str, title: Optional[str] = None):
  """Loss and accuracy per epoch, train and test, as the seed plots them."""
  if not records:
    return
  fig, (ax_loss, ax_acc) = loss_accuracy_figure()
  for split in ('train', 'test'):
    points = [(r['epoch'], r[f'{split}_loss'], r[f'{split}_accuracy'])
              for r in records if f'{split}_loss' in r]
    if points:
      x, loss, acc = zip(*points)
      style = '-' if len(points) > 1 else 'o'
      ax_loss.plot(x, loss, style, label=f'{split} loss')
      ax_acc.plot(x, acc, style, label=f'{split} accuracy')
  save_figure(fig, (ax_loss, ax_acc), path, title)


def loss_accuracy_figure():
  """(figure, (loss axes, accuracy axes)): the two panels of every jaxres plot (Agg)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt.subplots(1, 2, figsize=(11, 4))


def save_figure(fig, axes, path: str, title: Optional[str] = None):
  """Label the (loss, accuracy) panels per epoch, then write the figure to `path`
  atomically and close it."""
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator
  for ax, name in zip(axes, ('loss', 'accuracy')):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel('epoch')
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  tmp = f'{path}.tmp.png'
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)
