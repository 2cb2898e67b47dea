"""Compiled diffusers models: one file per model."""
