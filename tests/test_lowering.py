"""What the op compiles to: the project's custom calls, and memory linear in seqlen."""

import jax
import jax.numpy as jnp

import jax_flash as jf


def test_forward_and_backward_lower_to_the_custom_calls():
    q = jax.ShapeDtypeStruct((1, 16, 2, 32), jnp.bfloat16)
    fwd = jax.jit(lambda q: jf.flash_attn_func(q, q, q, causal=True)).lower(q).as_text()
    assert "custom_call @jax_flash_forward(" in fwd
    loss = lambda q: jnp.sum(jf.flash_attn_func(q, q, q).astype(jnp.float32))
    bwd = jax.jit(jax.grad(loss)).lower(q).as_text()
    assert "custom_call @jax_flash_forward(" in bwd and "custom_call @jax_flash_backward(" in bwd
    # nothing of the size of a score matrix (seqlen x seqlen) appears
    assert "16x16x" not in bwd and "x16x16x" not in bwd


def test_16k_by_16k_needs_far_less_memory_than_the_score_matrix():
    seqlen, heads, head_dim = 16384, 2, 64
    q = jax.ShapeDtypeStruct((1, seqlen, heads, head_dim), jnp.bfloat16)
    score_matrix_bytes = heads * seqlen * seqlen * 4  # float32 scores of one batch row

    def train_step(q, k, v):
        loss = lambda q, k, v: jnp.sum(jf.flash_attn_func(q, k, v, causal=True).astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    compiled = jax.jit(train_step).lower(q, q, q).compile()
    memory = compiled.memory_analysis()
    inputs_and_outputs = 6 * seqlen * heads * head_dim * 2
    assert memory.temp_size_in_bytes < score_matrix_bytes / 100
    assert memory.temp_size_in_bytes < 4 * inputs_and_outputs


def _backward_results(platform, shape):
    """The result types of the backward custom call when lowered for `platform`."""
    loss = lambda q: jnp.sum(jf.flash_attn_func(q, q, q, causal=True).astype(jnp.float32))
    q = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    text = jax.jit(jax.grad(loss)).trace(q).lower(lowering_platforms=(platform,)).as_text()
    line = next(l for l in text.splitlines() if "custom_call @jax_flash_backward(" in l)
    return line.rsplit("->", 1)[1]


def test_cuda_backward_gets_its_workspace_as_an_extra_result():
    # Lowering needs no GPU: this checks what the CUDA handler will be given, on any machine.
    batch, seqlen, heads, head_dim = 2, 37, 3, 24
    round_up = lambda n: -(-n // 256) * 256
    # delta and lse * log2(e), rows of seqlen rounded up to 4 floats; the dQ accumulator
    stats = round_up(batch * heads * 40 * 4)
    workspace = 2 * stats + round_up(batch * heads * seqlen * head_dim * 4)
    cuda = _backward_results("cuda", (batch, seqlen, heads, head_dim))
    assert cuda.count("tensor<") == 4 and f"tensor<{workspace}xui8>" in cuda, cuda
    cpu = _backward_results("cpu", (batch, seqlen, heads, head_dim))
    assert cpu.count("tensor<") == 3 and "ui8" not in cpu, cpu
