"""The learning domain. ``training.core`` is plain torch/transformers with no Django."""
