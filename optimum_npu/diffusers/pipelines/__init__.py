"""Compiled diffusers pipelines: diffusers' pipeline classes with compiled components."""
