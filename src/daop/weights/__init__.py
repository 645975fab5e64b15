"""Checkpoint reading (safetensors, lazy and validated) and weight placement."""
