"""TFDS's real imagenet2012 builder on a tiny manual directory in the official layout (no mock).

What the builder (tensorflow_datasets/datasets/imagenet2012) reads, and so what we build:
- manual_dir/ILSVRC2012_img_train.tar: one <synset>.tar per class, holding <synset>_<n>.JPEG.
  It iterates whatever synset tars are there (all 1000 are not required); a label is the
  synset's line in the shipped labels.txt, so ids are the official 0..999 ones.
- manual_dir/ILSVRC2012_img_val.tar: ILSVRC2012_val_<8 digits>.JPEG, flat. Labels come from the
  shipped validation_labels.txt, matched line by line to the SORTED file names in the tar: a
  partial validation tar is labelled right only if it holds the first k official names.
"""

import io
import os
import tarfile

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import common
from mvar_jax import convert, train
from mvar_jax import vqvae as vq
from mvar_jax.data import pipeline, token_cache

tfds = pytest.importorskip('tensorflow_datasets')

NUM_VAL = 6
TRAIN_PER_CLASS = 4
PATCH_NUMS = (1, 2, 4)


def _official(name):
  path = os.path.join(os.path.dirname(tfds.__file__), 'datasets', 'imagenet2012', name)
  with open(path) as f:
    return f.read().split()


def _jpeg(rng, h, w) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(buf, format='JPEG')
  return buf.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope='module')
def imagenet(tmp_path_factory):
  """A manual dir whose train classes are the synsets of the first NUM_VAL validation images."""
  root = tmp_path_factory.mktemp('imagenet')
  manual = root / 'manual'
  manual.mkdir()
  rng = np.random.default_rng(0)
  val_synsets = _official('validation_labels.txt')[:NUM_VAL]
  classes = sorted(set(val_synsets))
  with tarfile.open(manual / 'ILSVRC2012_img_train.tar', 'w') as outer:
    for synset in classes:
      inner_buf = io.BytesIO()
      with tarfile.open(fileobj=inner_buf, mode='w') as inner:
        for n in range(TRAIN_PER_CLASS):
          _add(inner, f'{synset}_{n + 1}.JPEG', _jpeg(rng, 40, 48))
      _add(outer, f'{synset}.tar', inner_buf.getvalue())
  with tarfile.open(manual / 'ILSVRC2012_img_val.tar', 'w') as val:
    for i in range(NUM_VAL):
      _add(val, f'ILSVRC2012_val_{i + 1:08d}.JPEG', _jpeg(rng, 36, 44))
  return root, classes, val_synsets


def data_config(root) -> ml_collections.ConfigDict:
  cfg = pipeline.default_data_config()
  cfg.name, cfg.num_classes, cfg.image_size = 'imagenet2012', 1000, 16
  cfg.data_dir, cfg.manual_dir = str(root / 'tfds'), str(root / 'manual')
  cfg.shuffle_buffer = 8
  return cfg


@pytest.fixture(scope='module')
def prepared(imagenet):
  """The real builder prepares the manual dir (create_dataset does it on first use)."""
  root, _, _ = imagenet
  it = pipeline.create_dataset(data_config(root), split='train', batch_size=4)
  next(it)
  return imagenet


def test_the_real_builder_prepares_the_official_layout(prepared):
  root, classes, _ = prepared
  builder = tfds.builder('imagenet2012', data_dir=str(root / 'tfds'))
  assert builder.is_prepared()
  splits = builder.info.splits
  assert splits['train'].num_examples == len(classes) * TRAIN_PER_CLASS
  assert splits['validation'].num_examples == NUM_VAL


def _all(cfg, split):
  it = pipeline.create_dataset(cfg, split=split, batch_size=4, shuffle=False, repeat=False,
                               drop_remainder=False)
  batches = list(it)
  return (np.concatenate([b['image'] for b in batches]),
          np.concatenate([b['label'] for b in batches]))


def test_labels_are_the_official_class_ids(prepared):
  root, classes, val_synsets = prepared
  names = _official('labels.txt')
  images, labels = _all(data_config(root), 'train')
  assert images.shape == (len(classes) * TRAIN_PER_CLASS, 16, 16, 3)
  assert sorted(np.unique(labels)) == sorted(names.index(s) for s in classes)
  assert np.bincount(labels, minlength=1000)[[names.index(s) for s in classes]].tolist() == [
      TRAIN_PER_CLASS] * len(classes)
  _, val_labels = _all(data_config(root), 'validation')
  # Read in file order (one shard): the k-th official validation image has the k-th label.
  assert sorted(val_labels.tolist()) == sorted(names.index(s) for s in val_synsets)


def _tiny_tokenizer(root):
  cfg = vq.VQVAEConfig(ch=8, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=4, vocab_size=16,
                       patch_nums=PATCH_NUMS, norm_groups=4, using_sa=False, using_mid_sa=False)
  shapes = jax.eval_shape(lambda: nn.unbox(vq.init_params(cfg, jax.random.key(0))['params']))
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map(
      lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  convert.save_converted(str(root / 'tok'), 'vqvae', cfg, params)
  return cfg, params


def test_train_steps_and_a_token_cache_from_the_prepared_dataset(prepared):
  root, classes, _ = prepared
  tok_cfg, tok_params = _tiny_tokenizer(root)
  # A few training steps straight from the images (tokenised inside the step).
  c = common.get_config()
  c.data = data_config(root)
  c.tokenizer.checkpoint = str(root / 'tok')
  m = c.model
  m.depth, m.width, m.num_heads, m.num_classes, m.vocab_size, m.cvae = 1, 32, 2, 1000, 16, 4
  m.patch_nums, m.refine_step, m.kernel_size, m.dtype = PATCH_NUMS, 2, 3, 'float32'
  c.mesh.data, c.mesh.fsdp, c.mesh.num_devices = 1, 1, 1
  t = c.train
  t.batch_size, t.num_steps, t.schedule = 4, 2, 'all'
  t.log_every, t.checkpoint_every, t.eval_every, t.sample_every, t.eval_batches = 1, 2, 0, 0, 1
  t.async_checkpointing = False
  metrics = train.train_and_evaluate(c, str(root / 'workdir'))
  assert np.isfinite(metrics['train/loss']) and np.isfinite(metrics['val/loss'])

  # Cache the tokens of the training split and read them back through the 'tokens' source.
  tok = vq.Tokenizer(tok_cfg)
  encode = jax.jit(lambda x: jax.numpy.concatenate(tok.img_to_ids(tok_params, x), axis=1))
  batches = pipeline.create_dataset(data_config(root), split='train', batch_size=4,
                                    shuffle=False, repeat=False, drop_remainder=False)
  cache = root / 'tokens'
  token_cache.build_token_cache(batches, encode, str(cache / 'train'),
                                num_scales_len=tok_cfg.layout.total_len, vocab_size=16,
                                patch_nums=PATCH_NUMS, image_size=16)
  cfg = pipeline.default_data_config()
  cfg.name, cfg.data_dir, cfg.num_classes, cfg.image_size = 'tokens', str(cache), 1000, 16
  ids, labels = [], []
  for b in pipeline.create_dataset(cfg, split='train', batch_size=4, shuffle=False,
                                   repeat=False, drop_remainder=False):
    ids.append(b['ids'])
    labels.append(b['label'])
  ids, labels = np.concatenate(ids), np.concatenate(labels)
  assert ids.shape == (len(classes) * TRAIN_PER_CLASS, tok_cfg.layout.total_len)
  _, image_labels = _all(data_config(root), 'train')
  np.testing.assert_array_equal(labels, image_labels)
