import importlib

from absl import flags

COMMANDS = ('jaxres.train', 'jaxres.eval', 'jaxres.predict', 'jaxres.export_torch',
            'tools.count_params', 'tools.compare_torch', 'tools.bench', 'tools.verify')


def test_commands_import_as_libraries_without_defining_flags():
  """Several commands define --config; importing them side by side (as tests and user
  code do) must not register any of their flags."""
  for name in COMMANDS:
    module = importlib.import_module(name)
    assert callable(module.command), name
  defined = set(flags.FLAGS)
  assert not defined & {'config', 'workdir', 'step', 'input', 'output', 'depth', 'steps'}
