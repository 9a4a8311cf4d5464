"""Run checkpoints: safetensors (one process) and DCP (distributed), published atomically."""
