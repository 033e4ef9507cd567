import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import base, smoke
from jaxres import config_lib, input_pipeline, layers, models, train_state
from jaxres.errors import UsageError
from jaxres.registry import Registry


def _init(config, batch=2, shapes_only=False):
  model = models.create_model(config)
  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, 32, 32, 3)), train=False)
  return model, (jax.eval_shape(init) if shapes_only else jax.jit(init)())


def test_base_parameter_count_is_the_seeds():
  _, variables = _init(base.get_config(), shapes_only=True)
  assert train_state.count_params(variables['params']) == 2_797_610


def test_output_shapes_train_and_eval():
  config = smoke.get_config()
  model, variables = _init(config)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, x)
  assert logits.shape == (4, 10)
  assert jax.tree.structure(updates['batch_stats']) == jax.tree.structure(variables['batch_stats'])


def test_architecture_follows_the_seed():
  _, variables = _init(base.get_config(), shapes_only=True)
  p = variables['params']
  assert p['conv1']['kernel'].shape == (3, 3, 3, 32)
  assert 'shortcut_conv' not in p['layer1_0']  # identity shortcut
  assert p['layer2_0']['conv1']['kernel'].shape == (3, 3, 32, 64)
  assert p['layer2_0']['shortcut_conv']['kernel'].shape == (1, 1, 32, 64)
  assert 'shortcut_conv' not in p['layer2_1']
  assert p['linear']['kernel'].shape == (256, 10) and p['linear']['bias'].shape == (10,)
  assert not any('bias' in k for k in p['conv1'])  # convs have no bias


def test_stride_two_downsamples_like_pytorch_padding():
  # 32 -> 32 -> 16 -> 8 -> 4, so the final pool sees a 4x4 map as in the seed.
  model = models.ResNet(widths=(4, 4, 4, 4), blocks=(1, 1, 1, 1))
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  _, state = jax.eval_shape(lambda v: model.apply(v, x, capture_intermediates=True,
                                                  mutable=['intermediates']), variables)
  sizes = [state['intermediates'][f'layer{i}_0']['__call__'][0].shape[1] for i in range(1, 5)]
  assert sizes == [32, 16, 8, 4]


def test_batchnorm_running_stats_use_unbiased_variance_and_torch_momentum():
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 4, 3)) * 2.0 + 1.0
  bn = layers.BatchNorm(momentum=0.1)
  variables = bn.init(jax.random.PRNGKey(0), x)
  y, updates = bn.apply(variables, x, mutable=['batch_stats'])
  flat = np.asarray(x).reshape(-1, 3)
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['var'], 0.9 + 0.1 * flat.var(0, ddof=1),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 3).mean(0), 0, atol=1e-5)


def test_batchnorm_groups_normalize_each_group_alone():
  x = jnp.concatenate([jnp.zeros((4, 2, 2, 1)) + 5.0, jnp.ones((4, 2, 2, 1)) * -3.0]) + \
      jax.random.normal(jax.random.PRNGKey(0), (8, 2, 2, 1))
  bn = layers.BatchNorm(num_groups=2)
  variables = bn.init(jax.random.PRNGKey(0), x)
  y, _ = bn.apply(variables, x, mutable=['batch_stats'])
  for g in range(2):
    assert abs(float(jnp.mean(y[4 * g:4 * (g + 1)]))) < 1e-5


@pytest.mark.parametrize('shape', [(3, 3, 32, 64), (256, 10)])
def test_torch_default_init_bounds(shape):
  w = layers.torch_kernel_init(jax.random.PRNGKey(0), shape)
  fan_in = int(np.prod(shape[:-1]))
  bound = 1 / np.sqrt(fan_in)
  assert float(jnp.max(jnp.abs(w))) <= bound
  np.testing.assert_allclose(float(jnp.std(w)), bound / np.sqrt(3), rtol=0.05)


# ---------------------------------------------------------------------------- fast recipe model

@pytest.mark.parametrize('size', [2, 3])
def test_max_pool_equals_flax_max_pool_with_gradient(size):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 9, 3))  # odd sizes: remainders dropped
  ours = layers.max_pool(x, size)
  np.testing.assert_array_equal(ours, nn.max_pool(x, (size, size), (size, size)))
  grad = lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))(x)
  np.testing.assert_allclose(grad(lambda x: layers.max_pool(x, size)),
                             grad(lambda x: nn.max_pool(x, (size, size), (size, size))), rtol=1e-6)


def test_max_pool_gradient_goes_to_every_tied_maximum():
  x = jnp.array([[1., 3.], [3., 0.]]).reshape(1, 2, 2, 1)
  g = jax.grad(lambda x: jnp.sum(2 * layers.max_pool(x, 2)))(x)
  np.testing.assert_array_equal(g.reshape(2, 2), [[0., 2.], [2., 0.]])


def test_dirac_init_is_the_identity_on_the_first_channels():
  kernel = models.dirac_kernel_init()(jax.random.PRNGKey(0), (3, 3, 4, 6))
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 5, 4))
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(y[..., :4], x, atol=1e-6)
  assert float(jnp.std(kernel[..., 4:])) > 0  # the other channels keep the random init


def test_whitening_kernel_whitens_the_training_patches():
  rng = np.random.default_rng(0)
  mixing = np.array([[1.0, 0.8, 0.6], [0.0, 0.5, 0.4], [0.0, 0.0, 0.3]])
  images = (rng.normal(size=(64, 8, 8, 3)) @ mixing).astype(np.float32)
  kernel = models.whitening_kernel(images, kernel_size=2, eps=1e-9)
  assert kernel.shape == (2, 2, 3, models.whitening_width(2))
  np.testing.assert_array_equal(kernel[..., 12:], -kernel[..., :12])  # +v and -v
  responses = jax.lax.conv_general_dilated(images, kernel[..., :12], (1, 1), 'VALID',
                                           dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  flat = np.asarray(responses).reshape(-1, 12).astype(np.float64)
  np.testing.assert_allclose(flat.T @ flat / len(flat), np.eye(12), atol=1e-3)


def test_fast_model_shapes_budget_and_data_init():
  from experiments import fast
  config = fast.get_config()
  total, shapes = config_lib.param_count(config)
  assert total == 1_971_640 <= config.param_budget
  assert shapes['whiten']['kernel'].shape == (2, 2, 3, 24)
  assert shapes['linear']['kernel'].shape == (256, 10)
  assert 'scale' not in shapes['group1']['norm1']  # BatchNorm without scale
  split, _ = input_pipeline.synthetic(64, 10)
  with config.unlocked():
    config.model.whiten_images = 32
    config.model.conv_impl = 'xla'  # compiles faster; tests/test_conv.py covers the rest
  images = input_pipeline.normalize(split.images[:models.data_images(config)],
                                    config.data.mean, config.data.std)
  assert len(images) == 32
  overrides = models.data_init(config, images)
  assert overrides['whiten']['kernel'].shape == (2, 2, 3, 24)
  model = models.create_model(config)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
  logits = model.apply(variables, jnp.zeros((2, 32, 32, 3)))
  assert logits.shape == (2, 10)


def test_a_model_registered_outside_the_package_builds_by_config(monkeypatch):
  """models.register from any module: config.model.name picks it, with the platform's
  convolution and its data init (the first data_images(config) images)."""

  class Tiny(nn.Module):
    conv: object = nn.Conv

    @nn.compact
    def __call__(self, x, train=False):
      x = self.conv(4, (3, 3), name='conv')(x)
      return nn.Dense(10, name='linear')(x.mean(axis=(1, 2)))

  registry = Registry('model', 'config.model.name')
  for name in models.MODELS:
    registry.register(name, models.MODELS.get(name))
  monkeypatch.setattr(models, 'MODELS', registry)

  @models.register('tiny', data_init=lambda config, images: {'n': len(images)},
                   data_images=lambda config: 3)
  def tiny(config, conv_defs, num_devices):
    return Tiny(conv=conv_defs.get('conv', nn.Conv))

  config = smoke.get_config()
  config.model.name = 'tiny'
  config_lib.validate(config)
  model = models.create_model(config)
  assert isinstance(model, Tiny) and models.data_images(config) == 3
  assert models.data_init(config, np.zeros((3, 32, 32, 3), np.float32)) == {'n': 3}
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))
  assert shapes['params']['conv']['kernel'].shape == (3, 3, 3, 4)
  config.model.name = 'resnet'
  assert models.data_images(config) == 0 and models.data_init(config, None) == {}
  config.model.name = 'nope'
  with pytest.raises(UsageError, match='config.model.name must be one of resnet, '
                     'whitened_resnet or tiny'):
    config_lib.validate(config)
