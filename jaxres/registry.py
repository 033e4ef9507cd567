"""Registries: names a config can choose, mapped to what they build.

One registry per extension point, each living beside what it registers (models in
`models.py`, datasets in `input_pipeline.py`, augmentation policies in `augment.py`,
schedules in `optim.py`, test-time modes in `evaluation.py`). Config validation and its
error messages read their names; code outside the package adds entries the same way:

    from jaxres import models

    @models.register('tiny')
    def tiny(config, conv_defs, num_devices):
      ...

    python -m jaxres.train --config my_config.py   # my_config.py imports the module above
"""

from typing import Any, Iterator

from jaxres.errors import UsageError


class Registry:
  """An ordered name -> entry map for one extension point.

  `field` is the config field that names an entry (for error messages, e.g.
  'config.model.name').
  """

  def __init__(self, kind: str, field: str):
    self.kind = kind
    self.field = field
    self._entries: dict[str, Any] = {}

  def register(self, name: str, entry: Any = None, *, replace: bool = False) -> Any:
    """Adds `entry` under `name`; without `entry`, a decorator that adds what it decorates.

    A name is registered once unless `replace` is set (re-running a module that
    registers, as tests and notebooks do, needs it).
    """

    def add(value):
      if name in self._entries and not replace and self._entries[name] is not value:
        raise ValueError(f'{self.kind} {name!r} is already registered')
      self._entries[name] = value
      return value

    return add if entry is None else add(entry)

  def get(self, name: str) -> Any:
    """The entry for `name`; UsageError naming the field and the choices if none."""
    if name not in self._entries:
      raise UsageError(f'{self.field} must be one of {self.choices()}, got {name!r}')
    return self._entries[name]

  def names(self) -> tuple[str, ...]:
    return tuple(self._entries)

  def choices(self) -> str:
    """'a, b or c': the names for messages and help."""
    names = list(self._entries)
    return names[0] if len(names) == 1 else ', '.join(names[:-1]) + ' or ' + names[-1]

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def __repr__(self) -> str:
    return f'Registry({self.kind!r}: {", ".join(self._entries)})'
