"""Decoding with a KV cache, diffusion samplers, classifier-free guidance."""
