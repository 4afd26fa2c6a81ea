"""Gemma in plain PyTorch: the config, the model (KV tensors in and out, no in-place cache), and
the loaders, which hold all checkpoint-format knowledge."""
