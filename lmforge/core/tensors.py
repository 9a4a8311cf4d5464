"""Tensor conventions every stage shares."""

IGNORE_INDEX = -100  # label of a position with no loss (PyTorch's cross_entropy default, HF's convention)
