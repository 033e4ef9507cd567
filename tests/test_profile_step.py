"""tools.profile_step: op attribution from a trace, and the command end to end."""

import json

import pytest

from tools import profile_step

HLO = '''
  %ynn_fusion.80 = f32[36,4096,256]{2,1,0} fusion(%a, %b), kind=kCustom, metadata={op_name="jit(train_step)/transpose(jvp(WhitenedResNet))/group3/conv1/dot_general" stack_frame_id=73}
  ROOT %add.3 = f32[10]{0} add(%c, %d), metadata={op_name="jit(train_step)/add" stack_frame_id=1}
  %maximum_bitcast_fusion = f32[8,7,7,256]{3,2,1,0} fusion(%e), kind=kLoop, metadata={op_name="jit(train_step)/jvp(WhitenedResNet)/group2/max"}
'''


def test_op_names_and_layers():
  names = profile_step.op_names(HLO)
  assert set(names) == {'ynn_fusion.80', 'add.3', 'maximum_bitcast_fusion'}
  assert profile_step.layer_of(names['ynn_fusion.80']) == 'group3/conv1 bwd'
  assert profile_step.layer_of(names['maximum_bitcast_fusion']) == 'group2 fwd'
  assert profile_step.layer_of(names['add.3']) == 'update'
  assert profile_step.layer_of('jit(train_step)/jvp(ResNet)/reduce_max') == '(model) fwd'
  assert profile_step.kind_of('ynn_fusion.80') == 'ynn_fusion'


def test_aggregate_sums_per_step_and_skips_runtime_spans():
  names = profile_step.op_names(HLO)
  events = [{'ph': 'X', 'name': 'ynn_fusion.80', 'dur': 300_000},
            {'ph': 'X', 'name': 'ynn_fusion.80', 'dur': 100_000},
            {'ph': 'X', 'name': 'add.3', 'dur': 2_000},
            {'ph': 'X', 'name': 'ThunkExecutor::Execute', 'dur': 999_000},
            {'ph': 'X', 'name': 'mystery_kernel', 'dur': 4_000},
            {'ph': 'i', 'name': 'add.3'}]
  r = profile_step.aggregate(events, names, num_steps=2, top=1)
  assert r['ops_ms'] == 201.0 and r['unmatched_ms'] == 2.0
  assert r['by_layer_ms'] == {'group3/conv1 bwd': 200.0, 'update': 1.0}
  assert r['by_kind_ms'] == {'ynn_fusion': 200.0, 'add': 1.0}
  assert r['top_ops'] == [{'op': 'ynn_fusion.80', 'layer': 'group3/conv1 bwd', 'ms': 200.0}]
  assert r['between_ops_ms'] == 0.0  # these events have no timestamps


def test_between_ops_is_the_time_no_op_covers():
  names = profile_step.op_names(HLO)
  events = [{'ph': 'X', 'name': 'ynn_fusion.80', 'ts': 0, 'dur': 100_000},
            {'ph': 'X', 'name': 'add.3', 'ts': 50_000, 'dur': 100_000},  # overlaps
            {'ph': 'X', 'name': 'ThunkExecutor::Execute', 'ts': 0, 'dur': 900_000},
            {'ph': 'X', 'name': 'ynn_fusion.80', 'ts': 400_000, 'dur': 100_000}]
  r = profile_step.aggregate(events, names, num_steps=2, top=1)
  assert r['between_ops_ms'] == 125.0  # 150 ms to 400 ms, over 2 steps


@pytest.mark.cpu_only  # reads XLA:CPU's op names
def test_profile_step_on_the_smoke_model(run_main):
  proc = run_main('tools.profile_step', '--config', 'experiments/smoke.py', '--batch_size', '8',
                  '--epoch', '2',
                  '--steps', '1', '--top', '3', '--json')
  assert proc.returncode == 0, proc.stderr
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r['step_ms'] > 0 and r['ops_ms'] > 0 and len(r['top_ops']) == 3 and r['epoch'] == 2
  layers = r['by_layer_ms']
  assert any(k.endswith(' fwd') for k in layers) and any(k.endswith(' bwd') for k in layers)
  assert 'update' in layers
  assert 'by layer' in profile_step.format_report(r)


def test_profile_step_bad_input(run_main):
  proc = run_main('tools.profile_step', '--steps', '0')
  assert proc.returncode == 2 and proc.stderr.count('\n') == 1
