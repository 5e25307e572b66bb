"""Test setup: 8 fake CPU devices, configured before jax initialises.

Every sharded code path runs on a real 8-device mesh in CI; tests compare sharded
results with single-device results.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)

import pytest  # noqa: E402


def pytest_configure(config):
    assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"


@pytest.fixture(scope="session")
def devices():
    return jax.devices()
