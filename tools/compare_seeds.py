"""The seed's recipe run to its end in PyTorch and in jaxres, several seeds each, compared.

    python -m tools.compare_torch --train --seeds 3 --train_images N --test_images M --out DIR
        [--epochs E] [--config experiments/base.py] [--config.FIELD=...]

Both frameworks train the config on the same images: the config's data restricted to a
class-balanced subset (data.train_subset / data.test_subset, input_pipeline.balanced_subset).
Seeds config.seed, config.seed + 1, ... are run one after the other, a jaxres run and a
PyTorch run for each seed:

DIR/jaxres/seed_K  a jaxres.train run (metrics.jsonl, checkpoints/, ...)
DIR/torch/seed_K   the seed's own PyTorch loop (`torch_train_and_evaluate`): its
                   ModifiedResNet initialized by torch.manual_seed(K), torch.optim.Adam,
                   ReduceLROnPlateau stepped on the test loss after each epoch, a
                   DataLoader(shuffle=True) through the seed's torchvision transforms; the
                   same metrics.jsonl schema, and checkpoint.pt after each epoch
DIR/compare.json, compare.md, compare.png   the comparison (`report`)

Rerunning the command resumes: a finished run is skipped, a stopped one continues after
its last finished epoch (a PyTorch run restores its RNG state too, so with
data.num_workers=0 it continues as if it had not stopped; with DataLoader workers their
augmentation draws start afresh). A jaxres run and a PyTorch run of one seed share only
its number: each framework initializes, shuffles and augments with its own generators, so
what is compared is two distributions, the difference of their means against the spread
that seeds alone cause.
"""

import json
import os
import time

import jax
import numpy as np
import torch

from jaxres import config_lib, input_pipeline, optim, reporting, torch_reference
from jaxres import train as train_lib
from jaxres.errors import UsageError
from . import compare_torch, run_stats

FRAMEWORKS = {'jaxres': 'jaxres', 'torch': 'PyTorch'}
CHECKPOINT = 'checkpoint.pt'
# Final figures compared between the frameworks; the verdict is on the first.
FINAL_METRICS = ('test_accuracy', 'test_loss', 'train_accuracy', 'train_loss')
TABLE_COLUMNS = (('train_loss', 'train loss'), ('train_accuracy', 'train acc'),
                 ('test_loss', 'test loss'), ('test_accuracy', 'test acc'),
                 ('learning_rate', 'lr'))


def _print(line: str) -> None:
  print(line, flush=True)  # progress reaches a log file as it happens


# ---------------------------------------------------------------------------- configs

def check_trainable(config) -> None:
  """UsageError naming a config field whose recipe the PyTorch loop does not mirror."""
  compare_torch.check_mirrored(config)
  if config.dtype != 'float32':
    raise UsageError(f'config.dtype={config.dtype!r}: the PyTorch side trains in float32')
  if config.eval_tta != 'none':
    raise UsageError(f'config.eval_tta={config.eval_tta!r}: the seed\'s test loop has no '
                     f'test-time augmentation (set it to \'none\')')


def comparison_config(config, epochs=None, train_images=None, test_images=None):
  """`config` with the command's --epochs, --train_images and --test_images applied."""
  config = config.copy_and_resolve_references()
  if epochs is not None:
    config.num_epochs = epochs
  if train_images is not None:
    config.data.train_subset = train_images
  if test_images is not None:
    config.data.test_subset = test_images
  config_lib.validate(config)
  check_trainable(config)
  return config


def run_config(config, seed: int):
  """The config of one run: `config` with its seed."""
  config = config.copy_and_resolve_references()
  config.seed = seed
  return config


def run_dir(out: str, framework: str, seed: int) -> str:
  return os.path.join(out, framework, f'seed_{seed}')


def seeds_of(config, num_seeds: int) -> list:
  return [config.seed + k for k in range(num_seeds)]


# ---------------------------------------------------------------------------- PyTorch

def torch_device() -> torch.device:
  return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def torch_train_loader(split, config, device) -> torch.utils.data.DataLoader:
  """The seed's training DataLoader over `split`: shuffled by torch's global RNG, the
  config's torchvision transforms (the seed's for data.augment=seed), the partial batch
  kept unless data.drop_last. Workers are spawned (JAX lives in this process, which
  rules out fork) once per run."""
  d = config.data
  dataset = torch_reference.ImageDataset(
      split.images, split.labels,
      input_pipeline.train_transform(d.augment, d.image_size, d.mean, d.std))
  return torch.utils.data.DataLoader(
      dataset, batch_size=config.batch_size, shuffle=True, drop_last=d.drop_last,
      num_workers=d.num_workers, persistent_workers=d.num_workers > 0,
      multiprocessing_context='spawn' if d.num_workers > 0 else None,
      pin_memory=device.type == 'cuda')


def torch_test_batches(split, config) -> list:
  """The seed's test batches (ToTensor, Normalize; batches of eval_batch_size, in order),
  made once: they are the same every epoch."""
  d = config.data
  dataset = torch_reference.ImageDataset(split.images, split.labels,
                                         input_pipeline.test_transform(d.mean, d.std))
  return list(torch.utils.data.DataLoader(dataset, batch_size=config.eval_batch_size))


def _save_checkpoint(path: str, epoch: int, model, optimizer, scheduler) -> None:
  state = {'epoch': epoch, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
           'scheduler': scheduler.state_dict() if scheduler else None,
           'rng': torch.get_rng_state(),
           'cuda_rng': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
  tmp = f'{path}.tmp'
  torch.save(state, tmp)
  os.replace(tmp, path)


def _restore_checkpoint(path: str, model, optimizer, scheduler, device) -> int:
  """Load the checkpoint into the objects; the epoch it ends (0 without one)."""
  if not os.path.exists(path):
    return 0
  state = torch.load(path, map_location=device, weights_only=True)
  model.load_state_dict(state['model'])
  optimizer.load_state_dict(state['optimizer'])
  if scheduler:
    scheduler.load_state_dict(state['scheduler'])
  torch.set_rng_state(state['rng'].cpu())
  if state['cuda_rng'] and torch.cuda.is_available():
    torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda_rng']])
  return state['epoch']


def torch_train_and_evaluate(config, workdir: str, log=_print) -> list:
  """Run (or resume) the seed's PyTorch training of `config` in `workdir`; the records.

  Each epoch's record (jaxres.train's schema; learning_rate is the rate the epoch
  trained at) is appended to metrics.jsonl before checkpoint.pt is replaced, so a stop
  between the two redoes that epoch.
  """
  train_lib.check_resume(config, workdir)
  train_split, eval_split, split_name = input_pipeline.evaluation_split(
      config.data, *input_pipeline.load(config.data, config.seed))
  device = torch_device()
  torch.manual_seed(config.seed)
  m = config.model
  model = torch_reference.ModifiedResNet(tuple(m.blocks), tuple(m.widths),
                                         m.num_classes).to(device)
  optimizer = compare_torch.torch_optimizer(config, model)
  p = config.plateau
  scheduler = (torch_reference.seed_scheduler(optimizer, p.factor, p.patience, p.threshold,
                                              p.cooldown)
               if optim.schedule(config).steps_on_test_loss else None)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CHECKPOINT)
  if not config.resume and os.path.exists(path):
    os.remove(path)
  loader = torch_train_loader(train_split, config, device)
  test_batches = torch_test_batches(eval_split, config)  # draws from the RNG: restore after
  done = _restore_checkpoint(path, model, optimizer, scheduler, device)
  metrics_log = reporting.MetricsLog(os.path.join(workdir, 'metrics.jsonl'))
  records = metrics_log.keep_through(done)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json(indent=2))
  log(f'PyTorch: {sum(t.numel() for t in model.parameters()):,} trainable parameters; '
      f'{len(train_split)} train / {len(eval_split)} {split_name} images; {device.type}, '
      f'{torch.get_num_threads()} thread(s)')
  for epoch in range(done + 1, config.num_epochs + 1):
    learning_rate = optimizer.param_groups[0]['lr']
    start = time.perf_counter()
    train_sums = torch_reference.train_epoch(model, optimizer, loader, config.label_smoothing)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    test_sums = torch_reference.evaluate(model, test_batches)
    record = train_lib.epoch_record(epoch, train_sums, test_sums, learning_rate, seconds,
                                    train_sums['count'], split_name)
    if scheduler:
      scheduler.step(record['test_loss'])
    record['eval_seconds'] = round(time.perf_counter() - start, 3)
    metrics_log.append(record)
    _save_checkpoint(path, epoch, model, optimizer, scheduler)
    records.append(record)
    log(reporting.epoch_line(record, config.num_epochs))
  return records


TRAINERS = {'jaxres': lambda config, workdir, log: train_lib.train_and_evaluate(config, workdir),
            'torch': torch_train_and_evaluate}


# ---------------------------------------------------------------------------- the runs

def finished_records(workdir: str, num_epochs: int):
  """A run's records of epochs 1..num_epochs if it has them all, else None."""
  records = [r for r in reporting.MetricsLog(os.path.join(workdir, 'metrics.jsonl')).read()
             if r['epoch'] <= num_epochs]
  return records if [r['epoch'] for r in records] == list(range(1, num_epochs + 1)) else None


def run_all(config, out: str, num_seeds: int, log=_print) -> dict:
  """Train (or resume, or skip) every run of the comparison, then write the report.

  The report is rewritten after each run that finishes, from the finished runs.
  """
  seeds = seeds_of(config, num_seeds)
  plan = [(framework, seed) for seed in seeds for framework in FRAMEWORKS]
  for framework, seed in plan:  # a config that differs from a saved run: refuse first
    train_lib.check_resume(run_config(config, seed), run_dir(out, framework, seed))
  log(f'compare_torch --train: {num_seeds} seed(s) ({", ".join(map(str, seeds))}) each of '
      f'jaxres and PyTorch; {_data_line(config)}; {config.num_epochs} epochs; in {out}')
  summary = None
  for number, (framework, seed) in enumerate(plan, start=1):
    workdir = run_dir(out, framework, seed)
    label = f'[{number}/{len(plan)}] {FRAMEWORKS[framework]} seed {seed} ({workdir})'
    if finished_records(workdir, config.num_epochs) is not None:
      log(f'{label}: finished, skipped')
      continue
    done = len(reporting.MetricsLog(os.path.join(workdir, 'metrics.jsonl')).read())
    log(f'{label}: ' + (f'resuming after epoch {done}' if done else 'training'))
    TRAINERS[framework](run_config(config, seed), workdir, log)
    summary = report(config, out, num_seeds)
  return summary or report(config, out, num_seeds)


def _data_line(config) -> str:
  d = config.data
  train, test = (f'{n:,}' if n else 'all' for n in (d.train_subset, d.test_subset))
  return f'{d.name} data, {train} train / {test} test images (class-balanced)'


# ---------------------------------------------------------------------------- the report

def summarize(config, out: str, num_seeds: int) -> dict:
  """Everything the report says, from the finished runs in `out` (JSON-ready)."""
  frameworks = {}
  for framework in FRAMEWORKS:
    runs = []
    for seed in seeds_of(config, num_seeds):
      workdir = run_dir(out, framework, seed)
      records = finished_records(workdir, config.num_epochs)
      if records is not None:
        runs.append({'seed': seed, 'workdir': os.path.relpath(workdir, out),
                     'cut_epochs': run_stats.cut_epochs(records),
                     'final': {k: records[-1][k] for k in FINAL_METRICS}, 'records': records})
    frameworks[framework] = {
        'runs': runs,
        'per_epoch': (run_stats.per_epoch([r['records'] for r in runs], config.num_epochs)
                      if runs else [])}
  final = {}
  if all(frameworks[f]['runs'] for f in FRAMEWORKS):
    for metric in FINAL_METRICS:
      ours, theirs = ([r['records'] for r in frameworks[f]['runs']] for f in FRAMEWORKS)
      final[metric] = run_stats.final_comparison(ours, theirs, metric, tuple(FRAMEWORKS))
  welch = final.get('test_accuracy', {}).get('welch')
  verdict = (run_stats.verdict(welch) if welch else
             'no verdict: Welch\'s interval needs 2 finished runs or more of each framework')
  return {'num_epochs': config.num_epochs, 'seeds': seeds_of(config, num_seeds),
          'data': _data_line(config), 'train_images': config.data.train_subset,
          'test_images': config.data.test_subset, 'frameworks': frameworks,
          'final': final, 'interval': 'Welch t, 95 %', 'verdict': verdict,
          'versions': {'jax': jax.__version__, 'torch': torch.__version__},
          'devices': {'jaxres': jax.default_backend(), 'torch': torch_device().type},
          'config': config_lib.to_dict(config)}


def _cell(spread, metric: str = '') -> str:
  """'mean ± std' (the mean alone for one run, or a learning rate that all runs share)."""
  if spread is None:
    return ''
  digits = '.1e' if metric == 'learning_rate' else '.4f'
  shown = spread['n'] > 1 and (spread['std'] or metric != 'learning_rate')
  return f'{spread["mean"]:{digits}}' + (f' ± {spread["std"]:{digits}}' if shown else '')


def markdown(summary: dict) -> str:
  """The report as Markdown: per-epoch table, every run's final figures, the verdict."""
  frameworks = summary['frameworks']
  counts = ', '.join(f'{len(frameworks[f]["runs"])} {name}' for f, name in FRAMEWORKS.items())
  lines = [f'The seed\'s recipe for {summary["num_epochs"]} epochs, {summary["data"]}; '
           f'finished runs: {counts} (seeds {", ".join(map(str, summary["seeds"]))}). '
           f'Per epoch, mean ± standard deviation over the runs.', '']
  header = ['epoch'] + [f'{label} {name}' for _, label in TABLE_COLUMNS
                        for name in FRAMEWORKS.values()]
  lines += ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  for epoch in range(1, summary['num_epochs'] + 1):
    rows = {f: (frameworks[f]['per_epoch'][epoch - 1] if frameworks[f]['per_epoch'] else {})
            for f in FRAMEWORKS}
    cells = [_cell(rows[f].get(metric), metric) for metric, _ in TABLE_COLUMNS for f in FRAMEWORKS]
    lines.append(f'| {epoch} | ' + ' | '.join(cells) + ' |')
  lines += ['', '| framework | seed | final test acc | final test loss | plateau cuts (first '
                'epoch at the lower rate) |', '| --- | --- | --- | --- | --- |']
  for f, name in FRAMEWORKS.items():
    for run in frameworks[f]['runs']:
      cuts = ', '.join(map(str, run['cut_epochs'])) or 'none'
      lines.append(f'| {name} | {run["seed"]} | {run["final"]["test_accuracy"]:.4f} | '
                   f'{run["final"]["test_loss"]:.4f} | {cuts} |')
  accuracy = summary['final'].get('test_accuracy')
  if accuracy:
    lines += ['', f'Final test accuracy: jaxres {_cell(accuracy["jaxres"])}, PyTorch '
                  f'{_cell(accuracy["torch"])}.']
    if accuracy['welch']:
      w = accuracy['welch']
      lines[-1] += (f' Difference of means (jaxres - PyTorch) {w["difference"]:+.4f}, 95 % '
                    f'interval [{w["low"]:+.4f}, {w["high"]:+.4f}] (Welch\'s t, '
                    f'{w["df"]:.1f} degrees of freedom).')
  lines += ['', f'Verdict: {summary["verdict"]}.']
  return '\n'.join(lines) + '\n'


def plot(summary: dict, path: str) -> None:
  """Mean curves of both frameworks with ±1 standard deviation shaded: loss, accuracy."""
  fig, axes = reporting.loss_accuracy_figure()
  for color, (f, name) in zip(('C0', 'C1'), FRAMEWORKS.items()):
    rows = summary['frameworks'][f]['per_epoch']
    if not rows:
      continue
    epochs = [r['epoch'] for r in rows]
    n = len(summary['frameworks'][f]['runs'])
    for ax, kind in zip(axes, ('loss', 'accuracy')):
      for split, style in (('train', '--'), ('test', '-')):
        mean = np.array([r[f'{split}_{kind}']['mean'] for r in rows])
        std = np.array([r[f'{split}_{kind}']['std'] for r in rows])
        ax.plot(epochs, mean, style, color=color, label=f'{name} {split} (n={n})')
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
  reporting.save_figure(fig, axes, path, f'jaxres and PyTorch, {summary["data"]}: mean ± 1 std '
                                          f'over seeds')


def report(config, out: str, num_seeds: int) -> dict:
  """Write DIR/compare.json, compare.md and compare.png from the finished runs."""
  summary = summarize(config, out, num_seeds)
  tmp = os.path.join(out, 'compare.json.tmp')
  with open(tmp, 'w') as f:
    json.dump(summary, f, indent=1)
  os.replace(tmp, os.path.join(out, 'compare.json'))
  with open(os.path.join(out, 'compare.md'), 'w') as f:
    f.write(markdown(summary))
  plot(summary, os.path.join(out, 'compare.png'))
  return summary
