"""Tests run on CPU with 8 simulated devices, from the repository root (the config's default paths)."""

import atexit
import os
import pathlib
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=wrong-import-position

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
os.chdir(REPO_ROOT)

# Tests build the same jitted steps again and again (each train.build jits fresh closures); XLA's persistent cache
# lets a test load a program another test compiled (tests/test_train.py: 117 s -> 92 s). A fresh directory each
# session, set through jax.config so that the processes tests spawn do not share it.
_XLA_CACHE = tempfile.mkdtemp(prefix="tunix_core_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
