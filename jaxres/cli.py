"""What every jaxres command shares: flag parsing and the mapping of errors to exit codes.

Exit codes: 0 success; 1 over budget (count_params); 2 bad input (one line on stderr,
no traceback); 3 non-finite loss; 128+N killed by signal N after a checkpoint.
"""

import logging as std_logging
import os
import sys
import sysconfig
import traceback
from typing import Callable, Optional

from absl import flags
from absl import logging

from jaxres.errors import Interrupted, NonFiniteLossError, UsageError, causes


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


def _library_file(filename: str) -> bool:
  """Whether `filename` is Python's, an installed package's or this module's."""
  stdlib = sysconfig.get_paths()['stdlib']
  return (filename.startswith('<') or filename.startswith(stdlib) or filename == __file__
          or any(f'{os.sep}{d}{os.sep}' in filename for d in ('site-packages', 'dist-packages')))


def config_file_error(exc: BaseException) -> Optional[str]:
  """'FILE, line N: Type: message' for an error in a config file (a syntax error, or
  an exception its get_config() or what it imports raised), else None. absl wraps a
  ValueError or TypeError of a flag's parser: the cause is looked for as well."""
  for e in causes(exc):
    if isinstance(e, SyntaxError) and e.filename:
      return f'{e.filename}, line {e.lineno}: {type(e).__name__}: {e.msg}'
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not _library_file(f.filename)]
    if frames:
      return f'{frames[-1].filename}, line {frames[-1].lineno}: {type(e).__name__}: {e}'
  return None


def _flag_error(e: Exception, argv: list) -> str:
  """The one line for a flag (or --config file) that did not parse; re-raises a bug."""
  located = config_file_error(e)
  if located:
    return f'cannot load the --config file: {located}'
  if isinstance(e, flags.Error):
    return str(e)
  if isinstance(e, (KeyError, AttributeError)):
    # ml_collections: an override of a field the config does not have, or a config
    # module without get_config().
    if 'get_config' in str(e):
      return f'the config file does not define get_config() ({e})'
    field = str(e).strip('"\'')
    overrides = ' '.join(a for a in argv if a.startswith('--config.'))
    return f'unknown config field {field!r} (in {overrides})'
  if isinstance(e, (OSError, ValueError, TypeError)):
    return f'{type(e).__name__}: {e}'
  raise e


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


def _quiet_libraries():
  """Silence what libraries report that a user can do nothing about: Orbax's and absl's
  chatter (jaxres reports what matters itself), asyncio's complaints from Orbax's writer
  threads, and TensorStore's reads that complete after a restore failed part-way (their
  callbacks find Orbax's event loop closed and are reported as unraisable)."""
  logging.set_verbosity(logging.FATAL)
  std_logging.getLogger('absl').setLevel(std_logging.CRITICAL + 1)
  std_logging.getLogger('asyncio').setLevel(std_logging.CRITICAL + 1)
  report = sys.unraisablehook

  def unraisable(event):
    if not (isinstance(event.exc_value, RuntimeError)
            and str(event.exc_value) == 'Event loop is closed'):
      report(event)

  sys.unraisablehook = unraisable


def run(main: Callable[[list], Optional[int]], argv: Optional[list] = None):
  """Parse absl flags, run main(argv), turn jaxres errors into one line and an exit code.
  `--help` (or -h) prints the command's usage."""
  argv = sys.argv if argv is None else argv
  if any(a in HELP_FLAGS for a in argv[1:]):
    _print_help(argv)
  _quiet_libraries()
  try:
    argv = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    fail(_one_line(_flag_error(e, argv)))
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
