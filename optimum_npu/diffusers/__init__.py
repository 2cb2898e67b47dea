"""diffusers pipelines and models on the simulated NPU (Stable Diffusion, Cosmos world models)."""
