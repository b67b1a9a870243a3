"""Distributed CLIP trainer: data, loss, loop, checkpoints."""
