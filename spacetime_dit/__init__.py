"""spacetime_dit: Sora-style text-to-video diffusion transformers in JAX/Flax (see README.md)."""
