"""Class consistency of generated built-in images, judged by a small CNN.

A class-conditional model trained on the built-in shapes should draw the shape and colour of the
class it was asked for. FID needs an Inception network and many samples; for the demo a tiny
classifier trained on fresh built-in images (seconds on a CPU) answers the question directly:
class_consistency = share of samples that the classifier assigns to their conditioning class.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mvar_jax import atomic_file, xla_cpu
from mvar_jax.data import builtin

Params = Any
# Stream of the classifier's own training images, far from the data pipeline's seeds (0, 1), so a
# generative model's training images are not the classifier's.
_TRAIN_SEED_OFFSET = 1_000


class ShapeClassifier(nn.Module):
  """Three conv stages and a global average: images float32 (B, H, W, 3) in [-1, 1] -> logits
  float32 (B, num_classes). Works at any image size; trained at one."""

  num_classes: int

  @nn.compact
  def __call__(self, x_BHWC):
    # The shapes are recognisable at 32 px; pooling larger images first keeps training cheap.
    factor = max(1, x_BHWC.shape[1] // 32)
    if factor > 1:
      x_BHWC = nn.avg_pool(x_BHWC, (factor, factor), strides=(factor, factor))
    for i, features in enumerate((16, 32, 32)):
      x_BHWC = nn.relu(nn.Conv(features, (3, 3), name=f'conv{i}')(x_BHWC))
      if i < 2:
        x_BHWC = nn.avg_pool(x_BHWC, (2, 2), strides=(2, 2))
    x_BC = jnp.mean(x_BHWC, axis=(1, 2))
    return nn.Dense(self.num_classes, name='head')(x_BC)


def _num_classes(params: Params) -> int:
  return int(params['params']['head']['kernel'].shape[-1])


def _as_unit_range(images) -> np.ndarray:
  """uint8 [0, 255] or float in [-1, 1] -> float32 [-1, 1]."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _predict_fn(num_classes: int):
  model = ShapeClassifier(num_classes)
  return jax.jit(lambda params, x: jnp.argmax(model.apply(params, x), -1).astype(jnp.int32),
                 compiler_options=xla_cpu.conv_net_options())


def train_classifier(image_size: int = 32, num_classes: int = 10, steps: int = 300, seed: int = 0,
                     *, batch_size: int = 64, num_train: int = 4_000,
                     learning_rate: float = 3e-3) -> Params:
  """Trains on fresh built-in images; returns variables {'params': ...}.

  The defaults take 10-20 s on 2 CPU cores (half of it compilation) and reach >= 98% on held-out
  built-in images with 10 classes; more classes need more steps and images (20 classes: about
  97% with steps=1500, num_train=8000).
  """
  images_NHW3, labels_N = builtin.generate(num_train, image_size=image_size,
                                           num_classes=num_classes,
                                           seed=_TRAIN_SEED_OFFSET + seed)
  x_NHW3 = jnp.asarray(_as_unit_range(images_NHW3))
  y_N = jnp.asarray(labels_N)
  model = ShapeClassifier(num_classes)
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

  def step(i, carry, x_NHW3, y_N, key_data):
    params, opt_state = carry
    key = jax.random.fold_in(key_data, i)
    k_idx, k_noise, k_flip, k_sigma = jax.random.split(key, 4)
    idx_B = jax.random.randint(k_idx, (batch_size,), 0, num_train)
    x_BHW3, y_B = x_NHW3[idx_B], y_N[idx_B]
    # Generated samples are noisier than renders; noise and flips make the judge tolerant of that.
    sigma_B = jax.random.uniform(k_sigma, (batch_size, 1, 1, 1), maxval=0.15)
    x_BHW3 = x_BHW3 + sigma_B * jax.random.normal(k_noise, x_BHW3.shape)
    flip_B = jax.random.bernoulli(k_flip, 0.5, (batch_size, 1, 1, 1))
    x_BHW3 = jnp.where(flip_B, x_BHW3[:, :, ::-1], x_BHW3)

    def loss_fn(p):
      logits_BV = model.apply(p, x_BHW3)
      return optax.softmax_cross_entropy_with_integer_labels(logits_BV, y_B).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # Init and the step are each one jitted program: on a CPU, compiling dozens of eager ops (init,
  # optimizer set-up, key splits) costs more than the training itself. (A fori_loop over the steps
  # compiles no faster and runs the convolutions far slower on XLA:CPU.) The data are arguments,
  # not closure constants, which XLA would fold into the program.
  @functools.partial(jax.jit, compiler_options=xla_cpu.conv_net_options())
  def init(x_1HW3, key):
    params = model.init(key, x_1HW3)
    return params, tx.init(params)

  train_step = jax.jit(step, donate_argnums=1, compiler_options=xla_cpu.conv_net_options())
  key_init, key_data = jax.random.split(jax.random.key(seed))
  carry = init(x_NHW3[:1], key_init)
  for i in range(steps):
    carry = train_step(np.int32(i), carry, x_NHW3, y_N, key_data)
  return jax.device_get(carry[0])


def classify(params: Params, images, *, batch_size: int = 512) -> np.ndarray:
  """images uint8 [0, 255] or float [-1, 1], (N, H, W, 3) -> predicted labels int32 (N,)."""
  x_NHW3 = _as_unit_range(images)
  predict = _predict_fn(_num_classes(params))
  out = [np.asarray(predict(params, x_NHW3[i:i + batch_size]))
         for i in range(0, len(x_NHW3), batch_size)]
  return np.concatenate(out) if out else np.zeros((0,), np.int32)


def class_consistency(params: Params, images, labels) -> float:
  """Share of images (N, H, W, 3) that the classifier assigns to their label (N,)."""
  labels = np.asarray(labels)
  if len(labels) == 0:
    raise ValueError('class_consistency needs at least one image')
  return float(np.mean(classify(params, images) == labels))


def save_classifier(path: str, params: Params, *, image_size: int) -> None:
  """Writes variables and the image size they were trained at as msgpack (atomically)."""
  blob = serialization.msgpack_serialize(
      {'variables': serialization.to_state_dict(jax.device_get(params)),
       'image_size': int(image_size)})
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic_file.write_atomically(path, lambda f: f.write(blob))


def load_classifier(path: str, *, image_size: int | None = None) -> Params:
  """Reads save_classifier's file; image_size, when given, must match the trained size."""
  with open(path, 'rb') as f:
    state = serialization.msgpack_restore(f.read())
  if image_size is not None and int(state['image_size']) != image_size:
    raise ValueError(f'classifier {path} was trained at image_size={state["image_size"]}, '
                     f'not image_size={image_size}')
  return state['variables']


def get_classifier(path: str | None, *, image_size: int = 32, num_classes: int = 10,
                   steps: int = 300, seed: int = 0) -> Params:
  """Loads the classifier cached at `path`, or trains one and caches it there."""
  if path and os.path.exists(path):
    params = load_classifier(path, image_size=image_size)
    if _num_classes(params) == num_classes:
      return params
  params = train_classifier(image_size, num_classes, steps, seed)
  if path:
    save_classifier(path, params, image_size=image_size)
  return params
