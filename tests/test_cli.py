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


# Every command, including those with their own argparse flags.
ALL_COMMANDS = COMMANDS + ('tools.profile_step', 'tools.bench_augment', 'tools.bench_transforms')


def test_every_command_answers_help(tmp_path):
  """--help and -h: what the command does, its flags with their defaults, exit 0; with
  --config, the config's fields."""
  import subprocess
  import sys
  from tests.conftest import REPO, cli_env
  runs = {(name, flag): subprocess.Popen([sys.executable, '-m', name, flag], cwd=REPO,
                                          env=cli_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
          for name in ALL_COMMANDS for flag in (('--help', '-h') if name == 'jaxres.eval'
                                                else ('--help',))}
  runs['fields'] = subprocess.Popen(
      [sys.executable, '-m', 'jaxres.train', '--config', 'experiments/fast.py', '--help'],
      cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for key, proc in runs.items():
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (key, err)
    assert out.strip() and 'Unknown command line flag' not in out + err, key
    if key != 'fields' and key[0] in COMMANDS:
      assert '\nFlags:\n' in out and '(default: ' in out, key
  assert '--config.model.name=' + repr('whitened_resnet') in out
  assert 'Config fields:' in out
