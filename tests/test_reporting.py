"""jaxres.reporting's JSON-lines reader: the one every metrics.jsonl reader uses."""

import pytest

from jaxres import reporting
from jaxres.errors import UsageError


def test_read_jsonl_drops_a_torn_last_line_and_names_a_bad_one(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  assert reporting.read_jsonl(str(path)) == []  # no file yet
  path.write_text('{"epoch": 1}\n\n{"epoch": 2}\n{"epo')  # the last append cut short
  assert reporting.read_jsonl(str(path)) == [{'epoch': 1}, {'epoch': 2}]
  assert reporting.MetricsLog(str(path)).read() == [{'epoch': 1}, {'epoch': 2}]
  path.write_text('{"epoch": 1}\n{"epoch": 2}')  # complete, its newline not yet written
  assert reporting.read_jsonl(str(path)) == [{'epoch': 1}, {'epoch': 2}]
  path.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
  with pytest.raises(UsageError, match=r'metrics.jsonl, line 2: not JSON'):
    reporting.read_jsonl(str(path))


def test_metrics_log_keeps_what_it_reads(tmp_path):
  log = reporting.MetricsLog(str(tmp_path / 'metrics.jsonl'))
  for epoch in (1, 2, 3):
    log.append({'epoch': epoch})
  with open(log.path, 'a') as f:
    f.write('{"epoch": 4, "tr')
  assert log.keep_through(2) == [{'epoch': 1}, {'epoch': 2}]
  assert reporting.read_jsonl(log.path) == [{'epoch': 1}, {'epoch': 2}]
