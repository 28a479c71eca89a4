"""Rectified-flow math: timesteps, shift, loss, samplers and guidance (pure functions)."""
