"""Evaluation of generated images: the FID Inception network, FID/sFID/IS/precision/recall,
feature extraction over a device mesh, and evaluators that the CLI and the trainer share."""
