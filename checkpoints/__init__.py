"""Checkpoint loaders (HF safetensors, GGUF) and the orbax format the engine restores from."""
