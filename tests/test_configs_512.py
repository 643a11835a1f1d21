"""The 512 px config: VAR-d36's pyramid, neighbourhood attention on every map from 13x13."""

import importlib

from mvar_jax import config_utils


def test_mvar_d36_512_loads_and_validates():
  c = importlib.import_module('configs.mvar_d36_512').get_config()
  tc = config_utils.transformer_config_from(c)
  assert tuple(tc.patch_nums) == (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
  assert tc.layout.total_len == 2240 and c.data.image_size == 16 * 32
  assert (tc.depth, tc.width, tc.num_heads) == (36, 2304, 36)
  neighbourhood_maps = [pn for si, pn in enumerate(tc.patch_nums)
                        if tc.attention.uses_neighborhood(si)]
  assert neighbourhood_maps == [13, 18, 24, 32]  # as at 256 px: every map >= 13x13
  assert tc.attention.kernel_size == 7
  c.tokenizer.checkpoint = '/x'
  config_utils.validate_config(c, check_mesh=False)


def test_mvar_d36_512_runlocal_is_the_small_256_px_model():
  c = importlib.import_module('configs.mvar_d36_512').get_config('runlocal')
  tc = config_utils.transformer_config_from(c)
  assert tc.depth == 2 and tc.layout.total_len == 680 and not c.init_from
  c.tokenizer.checkpoint = '/x'
  config_utils.validate_config(c, check_mesh=False)
