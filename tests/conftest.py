import os

# Every kernel output starts as NaN, so an element a kernel never writes fails the tests.
os.environ.setdefault("JAX_FLASH_POISON_OUTPUTS", "1")
# Eight CPU devices for the multi-device tests (sharding rules, ring and Ulysses attention);
# single-device tests run on the first, as before. Must be set before JAX starts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

# float64 references need x64; the op itself must behave the same with it on.
jax.config.update("jax_enable_x64", True)
