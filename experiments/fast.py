"""A fast CIFAR-10 recipe inside the 5M budget: whitened residual net, speed-run tricks.

    python -m jaxres.train --config experiments/fast.py --workdir runs/fast

The network and recipe follow the airbench94_muon speed run (Keller Jordan, 2024) in
jaxres's components, with a residual connection added around each group's second
convolution:

- model.name='whitened_resnet': a frozen 2x2 patch-whitening convolution computed from
  5000 training images (its bias trains for 3 epochs), three conv-pool-BN-GELU groups of
  widths 64/256/256, global max pool, a bias-free linear layer scaled by 1/9; BatchNorm
  without scale, eps 1e-12, momentum 0.4 (PyTorch convention); convolutions start as
  identities on their first channels.
- Muon for the convolution kernels (Nesterov momentum 0.6, update orthogonalized by 3
  Newton-Schulz iterations, kernel held at norm sqrt(out_channels)); Nesterov SGD
  (momentum 0.85) for the head and the biases, BatchNorm and whitening biases at 64x the
  head's rate; every rate decays linearly to 0 over the run; label smoothing 0.2.
- Batch 1024, data on the device: translation by up to 2 pixels with reflected borders
  and alternating flips, CIFAR-10 channel statistics.
- Lookahead with an averaged slow copy of the weights (airbench94's), chosen on a run
  holding out 5000 training images.
- No test-set evaluation until the end, then flip-and-translate test-time augmentation
  (airbench's six views, at equal weights).

airbench94_muon's rates are for a summed loss at batch 2000 and a head scaled by 1/256
(from a unit-variance init; the same function at init as PyTorch's default init scaled by
1/9). jaxres averages the loss: an SGD rate here is the per-example rate x the batch, the
head's rate is converted by (1/256)^2 / (1/9)^2 (what a step changes is rate x scale^2),
and the coupled L2 coefficient is the decay per step (2e-6 x batch) over the rate.
Muon's step has a fixed size, so at half the batch (twice the steps) its rate is
scaled by sqrt(1024 / 2000).
"""

from experiments import base

BATCH = 1024
LOGIT_SCALE = 1 / 9
MUON_BATCH = 2000  # airbench94_muon's batch, for which its rates are given
MUON_LR = 0.24
SUMMED_HEAD_LR = 0.67  # per example of a summed loss, for a head scaled by 1/256
SUMMED_BIAS_LR = 0.053
DECAY_PER_EXAMPLE = 2e-6  # decay per step = this x batch


def get_config():
  config = base.get_config()
  # 10 epochs: the count of the holdout run that chose lookahead (below), and what fits
  # the 30-minute CPU target (BENCHMARKS.md, fast.py's runs).
  config.num_epochs = 10
  config.batch_size = BATCH
  config.eval_batch_size = 1000

  head_lr = SUMMED_HEAD_LR * BATCH * (1 / 256) ** 2 / LOGIT_SCALE ** 2
  config.optimizer = 'sgd'
  config.momentum = 0.85
  config.nesterov = True
  config.learning_rate = head_lr
  config.weight_decay = DECAY_PER_EXAMPLE * BATCH / head_lr
  config.bias_lr_scale = SUMMED_BIAS_LR * BATCH / head_lr
  config.label_smoothing = 0.2
  config.schedule = 'triangle'  # linear decay from the start: no warm-up
  config.triangle.start, config.triangle.peak, config.triangle.end = 1.0, 0.0, 0.0
  config.frozen = ('whiten/kernel',)
  config.frozen_after = (('whiten/bias', 3, config.bias_lr_scale),)
  config.muon.enabled = True
  config.muon.learning_rate = MUON_LR * (BATCH / MUON_BATCH) ** 0.5
  config.muon.momentum = 0.6
  config.muon.nesterov = True
  config.muon.ns_steps = 3
  # Lookahead (airbench94's: every 5 steps from epoch 3, decay 0.95, rho growing as
  # (step / total)^3), chosen on a 10-epoch run holding out 5000 training images against
  # one without it (BENCHMARKS.md, holdout run 2).
  config.lookahead.enabled = True
  config.lookahead.start_epoch = 3
  config.lookahead.every = 5
  config.lookahead.decay = 0.95
  config.lookahead.power = 3.0

  config.model.name = 'whitened_resnet'
  config.model.widths = (64, 256, 256)
  config.model.whiten_kernel = 2
  config.model.whiten_images = 5000
  config.model.whiten_eps = 5e-4
  config.model.bn_momentum = 0.4
  config.model.bn_epsilon = 1e-12
  config.model.logit_scale = LOGIT_SCALE
  config.model.residual = True

  config.data.on_device = True
  config.data.augment = 'reflect_translate'
  config.data.alternating_flip = True
  config.data.drop_last = True
  config.data.mean = (0.4914, 0.4822, 0.4465)
  config.data.std = (0.2470, 0.2435, 0.2616)

  config.eval_every_epoch = False
  config.eval_tta = 'flip_translate'
  # airbench's six views at equal weights (its own weights are 0.5 for the unshifted pair):
  # the best of eight view sets compared on a 10-epoch run holding out 5000 training
  # images (BENCHMARKS.md, holdout run 1).
  config.eval_tta_center_weight = 1 / 3
  return config
