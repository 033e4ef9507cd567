import pickle
import re

import numpy as np
import pytest
from PIL import Image

from jaxres import input_pipeline, predict
from jaxres.errors import UsageError
from tests.conftest import run_probabilities, smoke_test_split


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


def test_predict_each_input_kind_gives_the_same_labels(smoke_run, run_main, images, tmp_path):
  workdir, _ = smoke_run
  labels = {}
  for kind in ('npy', 'pickle', 'folder'):
    path, ids = _write_inputs(kind, images, tmp_path)
    out = tmp_path / f'{kind}.csv'
    proc = run_main('jaxres.predict', '--workdir', workdir, '--input', path, '--output', out)
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == 'ID,Labels' and [l.split(',')[0] for l in lines[1:]] == ids
    labels[kind] = [int(l.split(',')[1]) for l in lines[1:]]
    assert all(0 <= l < 10 for l in labels[kind])
  assert labels['npy'] == labels['pickle'] == labels['folder']  # PNG is lossless


# ---------------------------------------------------------------------------- layouts

def _layouts(images):
  """The same images in every layout a competition file may use: {name: (array, layout)}."""
  chw = images.transpose(0, 3, 1, 2)
  n = len(images)
  return {'rows_chw': (chw.reshape(n, -1), 'auto'), 'rows_chw_explicit': (chw.reshape(n, -1), 'chw'),
          'rows_hwc': (images.reshape(n, -1), 'hwc'), 'nhwc': (images, 'auto'),
          'nhwc_explicit': (images, 'hwc'), 'nchw': (chw, 'auto'), 'nchw_explicit': (chw, 'chw')}


def test_decode_images_reads_every_layout_alike(images):
  for name, (array, layout) in _layouts(images).items():
    decoded = predict.decode_images(array, layout)
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, images), name
  # A row does not say its order: without --layout hwc it is CIFAR's channel-major.
  assert not np.array_equal(predict.decode_images(images.reshape(5, -1)), images)


@pytest.mark.parametrize('array, layout, message', [
    (np.zeros((5, 32, 3, 32), np.uint8), 'auto', 'N x 3072, N x 32 x 32 x 3 or N x 3 x 32 x 32'),
    (np.zeros((5, 1024), np.uint8), 'auto', 'got shape (5, 1024)'),
    (np.zeros((32, 32, 3), np.uint8), 'auto', 'got shape (32, 32, 3)'),
    (np.zeros((5, 32, 32, 3), np.uint8), 'chw', 'are hwc, not --layout chw'),
    (np.zeros((5, 3, 32, 32), np.uint8), 'hwc', 'are chw, not --layout hwc'),
    (np.zeros((5, 3072), np.float32), 'auto', 'expected uint8 pixels, got float32'),
    (np.zeros((0, 3072), np.uint8), 'auto', 'no images'),
    (np.zeros((5, 3072), np.uint8), 'whc', '--layout must be one of auto, chw, hwc'),
])
def test_decode_images_refuses_what_it_cannot_read(array, layout, message):
  with pytest.raises(UsageError, match=re.escape(message)):
    predict.decode_images(array, layout, source='f.pkl')


def test_a_folder_is_read_as_the_input_pipeline_reads_images(images, tmp_path):
  """Any of input_pipeline.IMAGE_EXTENSIONS, in any case; other files are left out; an
  image of another size is named."""
  folder = tmp_path / 'imgs'
  folder.mkdir()
  for i, name in enumerate(('a.PNG', 'b.bmp', 'c.png')):
    Image.fromarray(images[i]).save(folder / name, format='BMP' if name == 'b.bmp' else 'PNG')
  (folder / 'notes.txt').write_text('not an image')
  ids, got = predict.read_images(str(folder))
  assert ids == ['a', 'b', 'c'] and np.array_equal(got, images[:3])
  Image.fromarray(images[0][:16, :16]).save(folder / 'd.png')
  with pytest.raises(UsageError, match='d.png is 16x16; every image must be 32x32'):
    predict.read_images(str(folder))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(UsageError, match='no images in this folder'):
    predict.read_images(str(empty))


def test_read_images_takes_bytes_or_str_keys_and_ids(images, tmp_path):
  for keys, ids in (((b'data', b'ids'), np.arange(5) + 7), (('data', 'ids'), ['a', 'b', 'c', 'd', 'e']),
                    (('data', 'ids'), np.array([b'x1', b'x2', b'x3', b'x4', b'x5'])),
                    (('data',), None)):
    data = dict(zip(keys, (images, ids)))
    with open(tmp_path / 'f.pkl', 'wb') as f:
      pickle.dump(data, f)
    got_ids, got = predict.read_images(str(tmp_path / 'f.pkl'))
    assert np.array_equal(got, images)
    expected = list(range(5)) if ids is None else [
        i.decode() if isinstance(i, bytes) else i for i in np.asarray(ids).tolist()]
    assert got_ids == expected
  np.save(tmp_path / 'rows.npy', images.reshape(5, -1))
  assert np.array_equal(predict.read_images(str(tmp_path / 'rows.npy'), layout='hwc')[1], images)
  with open(tmp_path / 'f.pkl', 'wb') as f:
    pickle.dump({b'data': images, b'ids': np.arange(4)}, f)
  with pytest.raises(UsageError, match="'ids' must be 5 integers or strings"):
    predict.read_images(str(tmp_path / 'f.pkl'))
  with pytest.raises(UsageError, match='--layout applies to pickle and .npy inputs'):
    predict.read_images(str(tmp_path), layout='hwc')


def test_predict_on_competition_shaped_files(smoke_run, run_main, tmp_path):
  """10,000 uint8 images with shuffled IDs under b'ids', as each edition's file holds them
  (N x 3072 channel-major rows; N x 32 x 32 x 3): the CSV keeps the file's IDs in its
  order, the images are read right (the run labels them about as well as its test set),
  and both files give the same labels."""
  workdir, _ = smoke_run
  _, split = input_pipeline.synthetic(1, 10000)
  ids = np.random.default_rng(1).permutation(10000) + 1
  labels = {}
  for edition in ('rows_chw', 'nhwc'):
    path, out = tmp_path / f'{edition}.pkl', tmp_path / f'{edition}.csv'
    with open(path, 'wb') as f:
      pickle.dump({b'data': _layouts(split.images)[edition][0], b'ids': ids}, f)
    proc = run_main('jaxres.predict', '--workdir', workdir, '--input', path, '--output', out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f'wrote 10000 predictions to {out} (checkpoint ')
    assert out.read_text().startswith('ID,Labels\n')
    rows = np.loadtxt(out, delimiter=',', skiprows=1, dtype=np.int64)
    assert np.array_equal(rows[:, 0], ids)
    assert np.mean(rows[:, 1] == split.labels) > 0.9, edition  # its test accuracy: 0.99
    labels[edition] = rows[:, 1]
  assert np.array_equal(labels['rows_chw'], labels['nhwc'])


# ---------------------------------------------------------------------------- ensembles

def test_predict_with_an_ensemble_averages_its_runs_probabilities(smoke_run, second_smoke_run,
                                                                  run_main, tmp_path):
  """Two runs with different normalization and test-time augmentation: the ensemble's
  probabilities are the mean of each run's own, its labels their argmax."""
  (first, _), (second, _) = smoke_run, second_smoke_run
  images = smoke_test_split().images[:50]
  np.save(tmp_path / 'x.npy', images)
  out, probs = tmp_path / 'preds.csv', tmp_path / 'probs.csv'
  proc = run_main('jaxres.predict', '--workdir', first, '--workdir', second, '--input',
                  tmp_path / 'x.npy', '--output', out, '--probabilities', probs)
  assert proc.returncode == 0, proc.stderr
  assert f'an ensemble of 2 runs: {first} checkpoint 48, {second} checkpoint 16' in proc.stdout
  table = np.loadtxt(probs, delimiter=',', skiprows=1)
  assert probs.read_text().startswith('ID,0,1,2,3,4,5,6,7,8,9\n')
  assert np.array_equal(table[:, 0], np.arange(50))
  members = [run_probabilities(w, images, step='best') for w in (first, second)]
  assert not np.allclose(members[0], members[1], atol=1e-2)
  np.testing.assert_allclose(table[:, 1:], (members[0] + members[1]) / 2, atol=1e-5)
  labels = np.loadtxt(out, delimiter=',', skiprows=1, dtype=np.int64)[:, 1]
  assert np.array_equal(labels, ((members[0] + members[1]) / 2).argmax(1))
