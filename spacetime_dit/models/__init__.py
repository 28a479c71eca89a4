"""Flax Linen modules: the causal video autoencoder, patchify, layers, the DiT, the text encoder."""
