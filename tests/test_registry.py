"""jaxres.registry: the name -> entry maps behind every extension point."""

import pytest

from jaxres.errors import UsageError
from jaxres.registry import Registry


def test_register_get_names_and_errors():
  reg = Registry('model', 'config.model.name')

  @reg.register('a')
  def a():
    return 1

  reg.register('b', 2)
  assert reg.get('a') is a and reg.get('b') == 2
  assert reg.names() == ('a', 'b') and list(reg) == ['a', 'b'] and 'a' in reg and len(reg) == 2
  with pytest.raises(UsageError, match=r"config.model.name must be one of a or b, got 'c'"):
    reg.get('c')
  with pytest.raises(ValueError, match='already registered'):
    reg.register('b', 3)
  reg.register('b', 2)  # the same entry again: a module imported twice
  reg.register('b', 3, replace=True)
  assert reg.get('b') == 3


def _registries():
  from jaxres import augment, evaluation, input_pipeline, optim
  return [(optim.SCHEDULES, ('schedule',)), (optim.OPTIMIZERS, ('optimizer',)),
          (evaluation.TTA_MODES, ('eval_tta',)), (input_pipeline.DATASETS, ('data', 'name')),
          (augment.POLICIES, ('data', 'augment'))]


@pytest.mark.parametrize('index', range(5))
def test_validation_accepts_exactly_the_registered_names(index):
  """Each extension point's names are what config validation accepts, and its message
  lists them."""
  from experiments import smoke
  from jaxres import config_lib
  registry, field = _registries()[index]

  def config_with(name):
    config = smoke.get_config()
    node = config
    for key in field[:-1]:
      node = node[key]
    node[field[-1]] = name
    return config

  assert registry.field == 'config.' + '.'.join(field)
  for name in registry:
    config_lib.validate(config_with(name))
  with pytest.raises(UsageError, match=f'{registry.field} must be one of '
                     f'{registry.choices()}, got \'unheard_of\''):
    config_lib.validate(config_with('unheard_of'))
