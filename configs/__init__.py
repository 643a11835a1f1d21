"""Run configurations (ml_collections): `--config=configs/mvar_d16.py[:arg]`."""
