"""Errors that the command-line tools turn into exit codes.

Every jaxres command maps these to one line on stderr and a documented exit code
(see README, "When things go wrong"); anything else is a bug and keeps its traceback.
"""


def causes(exc):
  """`exc` and the exceptions that caused it (__cause__, else __context__), outermost
  first."""
  chain = []
  while exc is not None and all(exc is not e for e in chain):
    chain.append(exc)
    exc = exc.__cause__ or exc.__context__
  return chain


class UsageError(Exception):
  """Bad input: config, flags, data, paths. Exit code 2."""

  exit_code = 2


class NonFiniteLossError(Exception):
  """Training produced a NaN or Inf loss. Exit code 3."""

  exit_code = 3


class Interrupted(Exception):
  """SIGINT/SIGTERM arrived; a checkpoint was written. Exit code 128 + signal."""

  def __init__(self, signum: int):
    super().__init__(f'interrupted by signal {signum}')
    self.exit_code = 128 + signum
