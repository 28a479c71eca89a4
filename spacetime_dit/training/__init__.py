"""Train state, pure steps, the loop, checkpointing, metrics and the two training stages."""
