"""Logical axis names: the only sharding vocabulary that model code may use.

Models annotate parameters (`nn.with_logical_partitioning`) and activations
(`nn.with_logical_constraint`) with these names; `spacetime_dit.sharding.rules`
maps them to the mesh axes `('data', 'fsdp', 'tensor', 'sequence')`. Nothing in
`spacetime_dit.models` names a mesh axis or builds a `PartitionSpec`.
"""

# Parameter axes.
EMBED = "embed"  # D: model width (sharded over fsdp: ZeRO-3 style weights).
MLP = "mlp"  # F: hidden width of gated MLPs (tensor parallel).
HEADS = "heads"  # N: attention heads (tensor parallel).
HEAD_DIM = "head_dim"  # K: per-head width (never sharded).
VOCAB = "vocab"  # token vocabulary of the small text encoder.
MODULATION = "modulation"  # the 6 adaLN chunks (shift/scale/gate x 2).
CONV_IN = "conv_in"  # input channels of a convolution kernel.
CONV_OUT = "conv_out"  # output channels of a convolution kernel.
PATCH = "patch"  # flattened patch values (pt*ph*pw*C) at the DiT input/output.
NORM = "norm"  # scales and biases of norms (replicated).

# Activation axes.
ACT_BATCH = "act_batch"  # B
ACT_TOKENS = "act_tokens"  # L: spacetime tokens (sequence / context parallel).
ACT_TEXT = "act_text"  # S: text tokens.
ACT_EMBED = "act_embed"  # D
ACT_HEADS = "act_heads"  # N
ACT_MLP = "act_mlp"  # F
ACT_FRAMES = "act_frames"  # T of a video or latent (autoencoder activations).
ACT_HEIGHT = "act_height"  # H: spatial sharding of large frames in the autoencoder.
ACT_WIDTH = "act_width"  # W
ACT_CHANNELS = "act_channels"  # C
