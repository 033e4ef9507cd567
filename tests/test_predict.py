import pickle

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)


def _write_inputs(kind, images, tmp_path):
  if kind == 'npy':
    np.save(tmp_path / 'x.npy', images)
    return tmp_path / 'x.npy', [str(i) for i in range(5)]
  if kind == 'pickle':  # the seed's Kaggle format: channel-major rows under b'data'
    with open(tmp_path / 'test_batch', 'wb') as f:
      pickle.dump({b'data': images.transpose(0, 3, 1, 2).reshape(5, -1),
                   b'ids': np.arange(5) + 10}, f)
    return tmp_path / 'test_batch', [str(i + 10) for i in range(5)]
  folder = tmp_path / 'imgs'
  folder.mkdir()
  for i, img in enumerate(images):
    Image.fromarray(img).save(folder / f'im{i}.png')
  return folder, [f'im{i}' for i in range(5)]


def test_predict_each_input_kind_gives_the_same_labels(smoke_run, run_cli, images, tmp_path):
  workdir, _ = smoke_run
  labels = {}
  for kind in ('npy', 'pickle', 'folder'):
    path, ids = _write_inputs(kind, images, tmp_path)
    out = tmp_path / f'{kind}.csv'
    proc = run_cli('jaxres.predict', '--workdir', workdir, '--input', path, '--output', out)
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == 'ID,Labels' and [l.split(',')[0] for l in lines[1:]] == ids
    labels[kind] = [int(l.split(',')[1]) for l in lines[1:]]
    assert all(0 <= l < 10 for l in labels[kind])
  assert labels['npy'] == labels['pickle'] == labels['folder']  # PNG is lossless
