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


def run(main: Callable[[list], Optional[int]], argv: Optional[list] = None):
  """Parse absl flags, run main(argv), turn jaxres errors into one line and an exit code."""
  argv = sys.argv if argv is None else argv
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
