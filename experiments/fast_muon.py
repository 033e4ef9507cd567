"""fast.py with Muon for the convolution kernels (airbench94_muon's optimizer split).

    python -m jaxres.train --config experiments/fast_muon.py --workdir runs/fast_muon
"""

from experiments import fast

BATCH = 1024
MUON_BATCH = 2000  # airbench94_muon's batch, for which its rates are given
SUMMED_HEAD_LR = 0.67  # per example of a summed loss, head at logit scale 1/256
SUMMED_BIAS_LR = 0.053
WD_PER_EXAMPLE = 2e-6  # decay per step = this x batch


def get_config():
  config = fast.get_config()
  config.batch_size = BATCH
  # The head's rate for jaxres's mean loss and logit scale 1/9 (airbench94_muon: 1/256 with
  # a unit-variance init, the same function at init): lr x scale^2 is what matters.
  head_lr = SUMMED_HEAD_LR * BATCH * (1 / 256) ** 2 / config.model.logit_scale ** 2
  config.learning_rate = head_lr
  config.bias_lr_scale = SUMMED_BIAS_LR / (SUMMED_HEAD_LR * (1 / 256) ** 2 / config.model.logit_scale ** 2)
  config.weight_decay = WD_PER_EXAMPLE * BATCH / head_lr
  config.schedule = 'triangle'
  config.triangle.start, config.triangle.peak, config.triangle.end = 1.0, 0.0, 0.0
  config.frozen_after = (('whiten/bias', 3, config.bias_lr_scale),)
  config.lookahead.enabled = False
  config.muon.enabled = True
  # Muon's step has a fixed size; half airbench94_muon's batch takes twice its steps.
  config.muon.learning_rate = 0.24 * (BATCH / MUON_BATCH) ** 0.5
  config.muon.momentum = 0.6
  config.muon.ns_steps = 3
  return config
