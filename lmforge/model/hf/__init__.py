"""Hugging Face interop: one adapter per HF family (`base.HFAdapter`), listed once in `registry.ADAPTERS`
by `model_type`; `convert` reads and writes the directories, `io` the files every family shares.

To add a family: write `hf/<family>.py` (an `HFAdapter`, or a `StackedAdapter` when its tensors are HF
tensors stacked along dim 0, which needs only `module_map`) and add it to `registry.ADAPTERS`; add its
shape to `model/presets.py`; add a parity test (HF logits and greedy tokens == ours, export round-trips)
beside `tests/test_hf_families.py`.
"""
