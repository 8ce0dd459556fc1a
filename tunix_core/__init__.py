"""tunix_core: LLM post-training in JAX from one entry point, `python3 -m tunix_core.train`."""
