"""What every jaxres command shares: flag parsing and the mapping of errors to exit codes.

Exit codes: 0 success; 1 over budget (count_params); 2 bad input (one line on stderr,
no traceback); 3 non-finite loss; 128+N killed by signal N after a checkpoint.
"""

import logging as std_logging
import os
import sys
from typing import Callable, Optional

from absl import flags
from absl import logging

from jaxres.errors import Interrupted, NonFiniteLossError, UsageError


def fail(message: str, code: int = 2):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def _one_line(text: str) -> str:
  return ' '.join(str(text).split())


def config_value(holder):
  """The ConfigDict of a config_flags flag, or UsageError if its file did not load."""
  config = holder.value
  if config is None:
    return None
  try:
    config.keys()  # ml_collections defers a load failure to the first use
  except OSError as e:
    detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    raise UsageError(f'cannot load the --config file: {detail}') from None
  return config


HELP_FLAGS = ('--help', '-h', '--helpfull', '-help')


def _config_fields(config, prefix: str = '') -> list[str]:
  """'--config.FIELD=VALUE' for every field of a ConfigDict, nested ones dotted."""
  lines = []
  for key, value in sorted(config.items()):
    if hasattr(value, 'items'):
      lines += _config_fields(value, f'{prefix}{key}.')
    else:
      lines.append(f'  --config.{prefix}{key}={value!r}')
  return lines


def usage(doc: Optional[str]) -> str:
  """The --help text: the command's docstring, its flags with their defaults, and, for a
  command with --config, the config's fields (those of the file given, if any)."""
  parts = [(doc or '').strip(), 'Flags:' + flags.FLAGS.main_module_help().split(':', 1)[-1]]
  if 'config' in flags.FLAGS:
    try:
      config = flags.FLAGS['config'].value
      fields = _config_fields(config) if config is not None else []
    except Exception:  # pylint: disable=broad-except  # a config file that does not load
      fields = []
    parts.append('Config fields: every field of the --config file can be overridden as '
                 '--config.FIELD=VALUE; experiments/base.py documents each one.'
                 + ('\n' + '\n'.join(fields) if fields else ''))
  return '\n\n'.join(p for p in parts if p) + '\n'


def _print_help(argv: list):
  """Print usage() for the command being run and exit 0 (flags other than the help
  flag are parsed first where they can be, so that --config's fields are listed)."""
  try:
    flags.FLAGS([a for a in argv if a not in HELP_FLAGS])
  except Exception:  # pylint: disable=broad-except
    flags.FLAGS.mark_as_parsed()
  print(usage(getattr(sys.modules.get('__main__'), '__doc__', None)), end='')
  sys.exit(0)


def run(main: Callable[[list], Optional[int]], argv: Optional[list] = None):
  """Parse absl flags, run main(argv), turn jaxres errors into one line and an exit code.
  `--help` (or -h) prints the command's usage."""
  argv = sys.argv if argv is None else argv
  if any(a in HELP_FLAGS for a in argv[1:]):
    _print_help(argv)
  logging.set_verbosity(logging.ERROR)  # Orbax and absl chatter; jaxres prints its own
  std_logging.getLogger('asyncio').setLevel(std_logging.CRITICAL)  # Orbax's writer threads
  try:
    argv = flags.FLAGS(argv)
  except flags.Error as e:
    fail(_one_line(e))
  except (KeyError, AttributeError) as e:
    # ml_collections: an override of a field the config does not have, or a config
    # module without get_config().
    if 'get_config' in str(e):
      fail(_one_line(f'the config file does not define get_config() ({e})'))
    field = str(e).strip('"\'')
    overrides = ' '.join(a for a in argv if a.startswith('--config.'))
    fail(_one_line(f'unknown config field {field!r} (in {overrides})'))
  except (OSError, ValueError, TypeError) as e:
    fail(_one_line(f'{type(e).__name__}: {e}'))
  try:
    code = main(argv)
  except UsageError as e:
    fail(_one_line(e), e.exit_code)
  except NonFiniteLossError as e:
    fail(_one_line(e), e.exit_code)
  except Interrupted as e:
    print(f'{e}; checkpoint written, rerun the same command to resume', file=sys.stderr)
    sys.stdout.flush()
    os._exit(e.exit_code)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    sys.exit(130)
  sys.exit(code or 0)
