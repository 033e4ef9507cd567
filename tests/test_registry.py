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
