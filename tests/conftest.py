"""Test setup: 8 CPU devices for sharding tests, set before JAX is imported."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu's compile-only TPU devices (tests/accelerators.py) in both xdist workers at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Many tests (and the training processes they start, which inherit the environment) compile
# the same tiny programs; JAX's persistent cache compiles each once per machine.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mmjax-tests-jax-cache")
)
