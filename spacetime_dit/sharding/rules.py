"""Default logical-to-mesh rules: which mesh axes carry each logical axis.

A rule `(logical, mesh_axes)` maps a logical name to one mesh axis, a tuple of
mesh axes, or None (replicated). Experiments may override the table through
`config.mesh.rules`; the defaults give data + FSDP + tensor + sequence
parallelism in the MaxText style.
"""

from spacetime_dit.sharding import axes

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Activations: the batch is split over every data-like axis, tokens over `sequence`.
    (axes.ACT_BATCH, ("data", "fsdp")),
    (axes.ACT_TOKENS, "sequence"),
    (axes.ACT_TEXT, None),
    (axes.ACT_EMBED, None),
    (axes.ACT_HEADS, "tensor"),
    (axes.ACT_MLP, "tensor"),
    (axes.ACT_FRAMES, None),
    (axes.ACT_HEIGHT, "sequence"),
    (axes.ACT_WIDTH, None),
    (axes.ACT_CHANNELS, None),
    # Parameters: FSDP over the model width, tensor parallelism over heads and MLP width.
    (axes.EMBED, "fsdp"),
    (axes.MLP, "tensor"),
    (axes.HEADS, "tensor"),
    (axes.HEAD_DIM, None),
    (axes.VOCAB, None),
    (axes.MODULATION, None),
    (axes.CONV_IN, None),
    (axes.CONV_OUT, "fsdp"),
    (axes.PATCH, None),
    (axes.NORM, None),
)
