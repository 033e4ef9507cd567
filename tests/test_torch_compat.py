"""PyTorch checkpoints in and out: the seed's state_dict <-> jaxres variables, files, CLIs."""

import collections
import json

import jax
import numpy as np
import pytest
import torch
import torchvision

from experiments import base, smoke
from jaxres import models, torch_compat, torch_reference, train_state
from tests.conftest import read_metrics
from tools import compare_torch

SEED_STEPS = 40 * 391  # num_batches_tracked of the seed's 40-epoch checkpoint


def _seed_state_dict(seed=0, **model_kwargs):
  """A state_dict of the seed's model with every tensor (buffers too) away from its init."""
  model = torch_reference.ModifiedResNet(**model_kwargs)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for key, value in model.state_dict().items():
      if key.endswith(torch_compat.NUM_BATCHES_TRACKED):
        value.fill_(SEED_STEPS)
      elif key.endswith('running_var'):
        value.copy_(torch.rand(value.shape, generator=g) + 0.5)
      else:
        value.copy_(torch.randn(value.shape, generator=g))
  return model.state_dict()


def _abstract(config):
  model = models.create_model(config)
  return jax.eval_shape(lambda: train_state.init_variables(model, jax.random.PRNGKey(0)))


def test_round_trip_of_the_seed_state_dict_is_exact():
  state_dict = _seed_state_dict()
  assert len(state_dict) == 122 and 'layer2.0.shortcut.1.bias' in state_dict
  variables = torch_compat.variables_from_torch(state_dict)
  expected = _abstract(base.get_config())
  assert jax.tree.structure(variables) == jax.tree.structure(expected)
  for ours, theirs in zip(jax.tree.leaves(variables), jax.tree.leaves(expected)):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.float32
  assert train_state.count_params(variables['params']) == 2_797_610
  back = torch_compat.torch_state_dict(variables, torch_compat.batches_tracked(state_dict))
  assert list(back) == list(state_dict)  # PyTorch's key order
  for key, value in state_dict.items():
    assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_layouts_are_transposed_not_reshaped():
  state_dict = _seed_state_dict()
  variables = torch_compat.variables_from_torch(state_dict)
  np.testing.assert_array_equal(variables['params']['layer2_0']['shortcut_conv']['kernel'],
                                state_dict['layer2.0.shortcut.0.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['params']['linear']['kernel'],
                                state_dict['linear.weight'].numpy().T)
  np.testing.assert_array_equal(variables['batch_stats']['layer3_1']['bn2']['var'],
                                state_dict['layer3.1.bn2.running_var'].numpy())
  np.testing.assert_array_equal(variables['params']['layer4_0']['shortcut_bn']['scale'],
                                state_dict['layer4.0.shortcut.1.weight'].numpy())


def test_exported_state_dict_loads_strictly_into_the_torch_model():
  variables = torch_compat.variables_from_torch(_seed_state_dict())
  model = torch_reference.ModifiedResNet()
  model.load_state_dict(torch_compat.torch_state_dict(variables, num_batches_tracked=3),
                        strict=True)
  assert int(model.bn1.num_batches_tracked) == 3


def test_architecture_is_read_from_the_state_dict():
  kwargs = dict(num_blocks=(1, 3, 1, 2), widths=(8, 16, 24, 40), num_classes=7)
  model = torch_compat.infer_model(_seed_state_dict(**kwargs))
  assert (model.blocks, model.widths, model.num_classes) == ((1, 3, 1, 2), (8, 16, 24, 40), 7)


def _error(state_dict, model=None) -> str:
  with pytest.raises(torch_compat.IncompatibleStateDict) as info:
    torch_compat.variables_from_torch(state_dict, model)
  return str(info.value)


def test_a_foreign_state_dict_is_rejected_naming_the_key_and_shapes():
  message = _error(torchvision.models.resnet18().state_dict())
  assert message == ("state_dict does not fit ModifiedResNet(widths=(64, 128, 256, 512), "
                     "blocks=(2, 2, 2, 2), num_classes=10): 'conv1.weight' has shape "
                     "(64, 3, 7, 7), expected (64, 3, 3, 3)")
  message = _error(torch.nn.Linear(3, 4).state_dict())
  assert "no key 'layer1.0.conv1.weight'" in message and "'weight'" in message


def test_missing_unexpected_and_misshaped_keys_are_named():
  state_dict = _seed_state_dict()
  missing = collections.OrderedDict(state_dict)
  del missing['layer2.0.shortcut.1.bias']
  assert _error(missing).endswith("missing key 'layer2.0.shortcut.1.bias' (shape (64,))")
  extra = collections.OrderedDict(state_dict)
  extra['layer1.0.shortcut.0.weight'] = torch.zeros(32, 32, 1, 1)
  assert _error(extra).endswith("unexpected key 'layer1.0.shortcut.0.weight' "
                                "(shape (32, 32, 1, 1))")
  hundred = _seed_state_dict(num_classes=100)
  message = _error(hundred, models.create_model(base.get_config()))
  assert message.endswith("'linear.weight' has shape (100, 256), expected (10, 256)")


class _Payload:
  """An object whose unpickling would run code: torch.load(weights_only=True) must refuse."""

  def __reduce__(self):
    return (print, ('this must never run',))


def test_checkpoint_files_load_only_tensors(tmp_path, capsys):
  state_dict = _seed_state_dict(num_blocks=(1, 1, 1, 1), widths=(8, 16, 32, 64))
  path = tmp_path / 'plain.pth'
  torch.save(state_dict, path)
  loaded = torch_compat.load_torch_checkpoint(str(path))
  assert list(loaded) == list(state_dict) and all(torch.equal(loaded[k], state_dict[k])
                                                  for k in state_dict)
  # Training scripts' wrappers: a dict around it, DataParallel's 'module.' prefix.
  wrapped = tmp_path / 'wrapped.pth'
  torch.save({'model_state_dict': {f'module.{k}': v for k, v in state_dict.items()},
              'epoch': 40}, wrapped)
  assert list(torch_compat.load_torch_checkpoint(str(wrapped))) == list(state_dict)
  evil = tmp_path / 'evil.pth'
  torch.save({'state_dict': state_dict, 'extra': _Payload()}, evil)
  with pytest.raises(torch_compat.UsageError, match='refused it .Unsupported global: GLOBAL print'):
    torch_compat.load_torch_checkpoint(str(evil))
  assert 'must never run' not in capsys.readouterr().out
  garbage = tmp_path / 'garbage.pth'
  garbage.write_bytes(b'not a checkpoint')
  with pytest.raises(torch_compat.UsageError, match=f'^{garbage}: torch.load.weights_only=True. '
                     'refused it'):
    torch_compat.load_torch_checkpoint(str(garbage))
  (tmp_path / 'empty.pth').write_bytes(b'')
  with pytest.raises(torch_compat.UsageError, match='not a readable PyTorch checkpoint'):
    torch_compat.load_torch_checkpoint(str(tmp_path / 'empty.pth'))
  with pytest.raises(torch_compat.UsageError, match='does not exist'):
    torch_compat.load_torch_checkpoint(str(tmp_path / 'absent.pth'))


# ---------------------------------------------------------------------------- commands

@pytest.fixture(scope='module')
def exported(smoke_run, run_main, tmp_path_factory):
  """The smoke run's last checkpoint, exported by the command: (workdir, .pth, process)."""
  workdir, _ = smoke_run
  path = tmp_path_factory.mktemp('export') / 'smoke.pth'
  proc = run_main('jaxres.export_torch', '--workdir', workdir, '--output', path)
  assert proc.returncode == 0, proc.stderr
  return workdir, path, proc


def test_export_writes_what_pytorch_loads_strictly(exported):
  _, path, proc = exported
  assert proc.stdout.startswith(f'wrote {path}: checkpoint 48 of ')
  config = smoke.get_config()
  m = config.model
  model = torch_reference.ModifiedResNet(m.blocks, m.widths, m.num_classes)
  model.load_state_dict(torch.load(path, weights_only=True), strict=True)
  assert int(model.layer3[0].shortcut[1].num_batches_tracked) == 48  # the steps trained


def test_checkpoint_evaluates_the_same_in_jax_and_pytorch(exported, run_main):
  """A PyTorch state_dict evaluated by `jaxres.eval --torch-checkpoint` and by the seed's
  PyTorch test loop on the same test images: the same accuracy, the same predictions."""
  workdir, path, _ = exported
  proc = run_main('jaxres.eval', '--config', 'experiments/smoke.py', '--torch-checkpoint', path,
                  '--json')
  assert proc.returncode == 0, proc.stderr
  in_jax = json.loads(proc.stdout)
  assert in_jax['num_examples'] == 500 and in_jax['checkpoint'] == str(path)
  lines = []
  both = compare_torch.evaluate_checkpoint(
      smoke.get_config(), torch_compat.load_torch_checkpoint(str(path)), log=lines.append)
  assert both['differing_predictions'] == 0 and both['max_logit_difference'] < 1e-4, lines
  assert in_jax['test_accuracy'] == both['torch']['test_accuracy'] == \
      both['jaxres']['test_accuracy'] > 0.5
  assert in_jax['test_loss'] == pytest.approx(both['torch']['test_loss'], rel=1e-5)
  # ... and what the jaxres run itself measured at its last epoch.
  assert in_jax['test_accuracy'] == read_metrics(workdir)[-1]['test_accuracy']
  assert lines[-1] == 'predictions that differ: 0 of 500; max |logit difference| ' + \
      f'{both["max_logit_difference"]:.2e}'


def test_eval_rejects_a_checkpoint_of_another_shape_in_one_line(exported, run_main):
  _, path, _ = exported
  proc = run_main('jaxres.eval', '--config', 'experiments/base.py', '--torch-checkpoint', path)
  assert proc.returncode == 2
  assert proc.stderr.strip() == (
      "error: state_dict does not fit ModifiedResNet(widths=(32, 64, 128, 256), blocks=(2, 2, "
      "2, 2), num_classes=10): 'conv1.weight' has shape (8, 3, 3, 3), expected (32, 3, 3, 3)")


def test_export_errors_are_one_line(smoke_run, run_main, tmp_path):
  workdir, _ = smoke_run
  proc = run_main('jaxres.export_torch', '--workdir', workdir, '--output',
                  tmp_path / 'no' / 'such' / 'dir' / 'model.pth')
  assert proc.returncode == 2 and proc.stderr.startswith('error: cannot write ')
  assert len(proc.stderr.strip().splitlines()) == 1
  proc = run_main('jaxres.export_torch', '--workdir', workdir)
  assert proc.returncode == 2 and 'give --workdir DIR and --output FILE.pth' in proc.stderr
