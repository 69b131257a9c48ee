import os

# Every kernel output starts as NaN, so an element a kernel never writes fails the tests.
os.environ.setdefault("JAX_FLASH_POISON_OUTPUTS", "1")

import jax  # noqa: E402

# float64 references need x64; the op itself must behave the same with it on.
jax.config.update("jax_enable_x64", True)
