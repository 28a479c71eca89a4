"""Shared pytest setup: 8 fake CPU devices, so sharding tests run on any machine."""

import os
import tempfile

# Must happen before jax is imported anywhere: XLA reads the flags once at backend start.
# Tests run tiny shapes, where compiling dominates: the lowest backend optimisation level
# compiles about 2.5x faster and the programs still run in milliseconds.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA cache for the whole session (and the CLI subprocesses it starts), so
# the same tiny model is compiled once, not once per test workdir.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "spacetime_dit_test_xla_cache")
)
