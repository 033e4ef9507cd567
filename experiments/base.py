"""The seed, faithfully: the PyTorch notebook's ModifiedResNet and recipe.

    python -m jaxres.train --config experiments/base.py --workdir runs/base
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_epochs = 40
  config.batch_size = 128
  config.eval_batch_size = 100
  config.dtype = 'float32'  # float32 | bfloat16 (computation; parameters stay float32)
  # jax_default_matmul_precision for float32 matmuls and convolutions: default (JAX's:
  # TF32 on NVIDIA GPUs since Ampere, as PyTorch's default for convolutions; full float32
  # on the CPU) | tensorfloat32 | float32 (full, slower on GPUs) | bfloat16.
  config.matmul_precision = 'default'
  # JAX's persistent compilation cache, so later runs reuse compiled steps: auto
  # ($JAX_COMPILATION_CACHE_DIR, else ~/.cache/jaxres/xla) | none | a directory.
  config.compilation_cache = 'auto'
  config.param_budget = 5_000_000
  # Host memory (jaxres.cpu.host_allocator): 'hugepages' restarts the command once with glibc
  # asked for transparent huge pages, so the CPU backend's big buffers fault in 2 MB at a
  # time, not 4 KB (measured in BENCHMARKS.md); 'system' leaves malloc alone. Applied on
  # the CPU only (on an accelerator the activations live on the device).
  config.host_allocator = 'hugepages'

  # torch.optim.Adam(lr=1e-3, weight_decay=1e-4): L2 added to the gradient (not AdamW).
  config.optimizer = 'adam'
  config.learning_rate = 1e-3
  config.weight_decay = 1e-4
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  config.momentum = 0.9  # sgd only
  config.nesterov = False  # sgd only
  config.label_smoothing = 0.0
  # Parameter groups (see jaxres.optim.param_labels): regexes over 'module/param' paths.
  config.frozen = ()  # never trained, e.g. ('whiten/kernel',)
  config.frozen_after = ()  # ((regex, epochs[, lr_scale]), ...): trained for `epochs`, then frozen
  config.bias_lr_scale = 1.0  # BatchNorm biases: learning rate x this, weight decay / this
  # Muon for convolution kernels (jaxres.optim.orthogonalize): Nesterov momentum, then the
  # update orthogonalized by Newton-Schulz, at its own rate (which follows the schedule's
  # factor of learning_rate); the kernel rescaled to norm sqrt(out_channels) at each step.
  config.muon = ml_collections.ConfigDict()
  config.muon.enabled = False
  config.muon.params = r'kernel$'  # regex over paths; only 4-D (convolution) kernels
  config.muon.learning_rate = 0.24
  config.muon.momentum = 0.6
  config.muon.nesterov = True
  config.muon.ns_steps = 3
  config.muon.renormalize = True

  # ReduceLROnPlateau(mode='min', factor=0.1, patience=5, threshold=1e-4 'rel',
  # cooldown=0), stepped once per epoch on the test loss, as the seed does.
  config.schedule = 'plateau'  # plateau | constant | triangle
  config.triangle = ml_collections.ConfigDict()  # triangle: factors of learning_rate
  config.triangle.start = 0.2  # at step 0
  config.triangle.peak = 0.23  # fraction of the run where the learning rate peaks
  config.triangle.end = 0.07  # at the last step
  config.plateau = ml_collections.ConfigDict()
  config.plateau.factor = 0.1
  config.plateau.patience = 5
  config.plateau.threshold = 1e-4
  config.plateau.cooldown = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = 'resnet'  # in models.MODELS: resnet | whitened_resnet
  config.model.widths = (32, 64, 128, 256)
  config.model.blocks = (2, 2, 2, 2)
  config.model.num_classes = 10
  config.model.bn_momentum = 0.1  # PyTorch convention (weight of the new batch)
  config.model.bn_epsilon = 1e-5
  config.model.sync_batch_stats = True  # BatchNorm over the global batch on many devices
  # The CPU backend's fields (jaxres.cpu: plugged in on the CPU only, optional):
  config.model.conv_impl = 'auto'  # convolution formulation: auto picks by backend
  config.model.winograd_tile = 4  # m of Winograd F(m x m, 3 x 3) when conv_impl is winograd
  # Winograd transforms: auto = jaxres.cpu.native's compiled loops where they apply, else XLA's
  config.model.winograd_transforms = 'auto'
  # whitened_resnet only (experiments/fast.py)
  config.model.whiten_kernel = 2
  config.model.whiten_images = 5000  # training images whose patches are whitened
  config.model.whiten_eps = 5e-4
  config.model.logit_scale = 1.0
  config.model.residual = True

  config.data = ml_collections.ConfigDict()
  config.data.name = 'cifar10'  # cifar10 | imagefolder | synthetic
  config.data.root = 'data/cifar10'
  config.data.download = True
  config.data.num_workers = 2
  config.data.augment = 'seed'  # seed | flip_crop | reflect_translate | none
  # Dataset on the devices, augmentation inside the step (True), or torchvision's
  # transforms in DataLoader workers (False, the seed's own path). None: automatic, on
  # the device on an accelerator (a host loader would starve it), torchvision on a CPU.
  config.data.on_device = ml_collections.config_dict.placeholder(bool)
  config.data.steps_per_dispatch = 1  # on_device: optimizer steps per jitted call (lax.scan)
  config.data.prefetch = 2  # torchvision path: batches copied to the devices ahead
  config.data.alternating_flip = False  # on_device: mirror each image every other epoch
  config.data.drop_last = False  # the seed keeps the last, partial batch
  config.data.image_size = 32
  config.data.mean = (0.5, 0.5, 0.5)  # Normalize(mean, std), as the seed
  config.data.std = (0.5, 0.5, 0.5)
  # Evaluate on this many training images, held out of training, instead of the test
  # set (chosen by a permutation seeded with holdout_seed): for choices made on accuracy.
  config.data.holdout = 0
  config.data.holdout_seed = 0
  # Train / evaluate on this many images of the split (0: all), class-balanced and the
  # same in every run (input_pipeline.balanced_subset); holdout is taken from the subset.
  config.data.train_subset = 0
  config.data.test_subset = 0
  # synthetic only
  config.data.synthetic_train_size = 0
  config.data.synthetic_test_size = 0

  # Lookahead with an averaged slow copy of the weights (jaxres.optim.Lookahead).
  config.lookahead = ml_collections.ConfigDict()
  config.lookahead.enabled = False
  config.lookahead.start_epoch = 3
  config.lookahead.every = 5
  config.lookahead.decay = 0.95
  config.lookahead.power = 3.0

  config.eval_every_epoch = True  # False: evaluate on the test set once, after training
  config.eval_tta = 'none'  # test-time augmentation: none | flip | flip_translate
  # flip_translate's views: the flipped pair of the image at eval_tta_center_weight and of
  # each (dy, dx) shift (reflected borders) sharing the rest; these are airbench's.
  config.eval_tta_shifts = ((-1, -1), (1, 1))
  config.eval_tta_center_weight = 0.5

  config.checkpoint_keep = 3  # latest checkpoints kept, besides the best by test accuracy
  config.resume = True
  config.allow_config_change = False  # resume although the saved config differs
  config.progress = True  # progress bar within an epoch, on a terminal
  config.log_train_steps = False  # also write DIR/train_steps.jsonl (loss of every step)
  config.tensorboard = True  # also write TensorBoard event files into DIR (tensorboard --logdir)
  return config
