"""kernels.swiglu: the Pallas backward pass (interpret mode on CPU) against XLA's gradient,
and the model with `fuse_gate_up` against the unfused model, on one device and a mesh."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import functools

from llama_jax import Llama, ModelConfig, RunOptions, kernels, sharding


# The kernel in Pallas's interpret mode, on any backend.
swiglu_interpreted = functools.partial(kernels.swiglu, axes=kernels.GATE_UP_AXES, interpret=True)


def _reference(h):
    return jax.nn.silu(h[..., 0, :]) * h[..., 1, :]


def _exact_grad(h, g):
    """The derivative of silu(gate) * up in float64: d gate_up [..., 2, F]."""
    a, u, g64 = (np.asarray(x, np.float64) for x in (h[..., 0, :], h[..., 1, :], g))
    s = 1 / (1 + np.exp(-a))
    return np.stack([g64 * u * s * (1 + a * (1 - s)), g64 * a * s], axis=-2)


@pytest.mark.parametrize("shape", [(2, 16, 2, 512), (3, 5, 2, 96), (4, 2, 40)])  # last: F=40 falls back
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_kernel_matches_xla_gradient(shape, dtype):
    h = (2 * jax.random.normal(jax.random.PRNGKey(0), shape)).astype(dtype)
    g = jax.random.normal(jax.random.PRNGKey(1), shape[:-2] + shape[-1:]).astype(dtype)
    y, vjp = jax.vjp(swiglu_interpreted, h)
    y_ref, vjp_ref = jax.vjp(_reference, h)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    d, d_ref = np.asarray(vjp(g)[0], np.float32), np.asarray(vjp_ref(g)[0], np.float32)
    assert d.shape == h.shape
    scale = np.abs(d_ref).max()
    # The kernel computes in float32 and rounds once; XLA rounds bf16 intermediates.
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    assert np.abs(d - d_ref).max() <= tol * scale
    # Against a float64 computation of the derivative, float32 inputs only.
    if dtype == jnp.float32:
        exact = _exact_grad(h, g)
        assert np.abs(d - exact).max() <= 1e-6 * np.abs(exact).max()


CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128, multiple_of=64, max_seq_len=512)  # F = 192


def _grad_fn():
    """jitted (loss, grads) of the model run with the given RunOptions."""
    def grads(run, params, tokens, probe):
        def loss(p):
            return jnp.sum(Llama(CFG, run).apply({"params": p}, tokens) * probe)
        return jax.value_and_grad(loss)(params)
    return jax.jit(grads, static_argnums=0)


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("loop,remat", [("scan", "none"), ("unrolled", "dots_flash"), ("unrolled", "minimal")])
def test_fused_gate_up_equals_the_unfused_model(kernel, loop, remat):
    run = RunOptions(layer_loop=loop, remat_policy=remat, interpret_kernels=kernel)
    params = nn.unbox(Llama(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 520)).astype(np.int32)
    probe = np.random.default_rng(1).standard_normal((2, 520, CFG.vocab_size)).astype(np.float32)
    ref_loss, ref = _grad_fn()(run, params, tokens, probe)
    loss, got = _grad_fn()(run.replace(fuse_gate_up=True), params, tokens, probe)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref)):
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err < 1e-5, (jax.tree_util.keystr(path), err)


def test_fused_gate_up_kernel_runs_per_shard_on_a_mesh():
    """On a (2, 2, 2) mesh the kernel runs under shard_map (F split over "tensor"): same gradients."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (the CPU suite has 8 virtual ones)")
    run = RunOptions(layer_loop="unrolled", remat_policy="dots_flash", interpret_kernels=True)
    params = nn.unbox(Llama(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 256)).astype(np.int32)
    probe = np.random.default_rng(1).standard_normal((4, 256, CFG.vocab_size)).astype(np.float32)
    _, ref = _grad_fn()(run, params, tokens, probe)
    mesh = sharding.make_mesh((2, 2, 2))
    shapes = Llama(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    placed = jax.device_put(params, sharding.logical_to_shardings(shapes, mesh))
    fused = run.replace(fuse_gate_up=True)
    step = _grad_fn()
    with sharding.activate(mesh):
        lowered = step.lower(fused, placed, tokens, probe).as_text()
        _, got = step(fused, placed, tokens, probe)
    assert "shard_map" in lowered or "sdy.manual_computation" in lowered
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref)):
        err = np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(b).max()
        assert err < 1e-5, (jax.tree_util.keystr(path), err)


def _backend_kernel_case():
    """(dtype, interpret): bf16 through the real kernel on a GPU; float32 through interpret mode elsewhere."""
    if jax.default_backend() == "gpu":
        return jnp.bfloat16, False
    return jnp.float32, True


def test_swiglu_kernel_per_shard_equals_whole():
    """Under a mesh (rows over data x fsdp, F over tensor) every shard runs the same
    elementwise kernel: bit-equal to one call over the whole array, and within one
    rounding of the output dtype of the float64 derivative."""
    dtype, interpret = _backend_kernel_case()
    n = jax.device_count()
    if n < 2:
        pytest.skip("needs several devices")
    mesh = sharding.make_mesh((2, 2, 2) if n >= 8 else (1, n, 1))
    h = (2 * jax.random.normal(jax.random.PRNGKey(0), (8, 128, 2, 512))).astype(dtype)
    g = jax.random.normal(jax.random.PRNGKey(1), (8, 128, 512)).astype(dtype)
    swiglu = functools.partial(kernels.swiglu, axes=kernels.GATE_UP_AXES, interpret=interpret)
    grad = jax.jit(lambda h, g: jax.vjp(swiglu, h)[1](g)[0])
    whole = np.asarray(grad(h, g), np.float32)
    spec = sharding.logical_sharding(mesh, kernels.GATE_UP_AXES)
    with sharding.activate(mesh):
        hs = jax.device_put(h, spec)
        gs = jax.device_put(g, sharding.logical_sharding(mesh, ("batch", "seq", "mlp")))
        lowered = grad.lower(hs, gs).as_text()
        assert "shard_map" in lowered or "manual_computation" in lowered
        sharded = np.asarray(grad(hs, gs), np.float32)
    np.testing.assert_array_equal(sharded, whole)
    exact = _exact_grad(h, g)
    # bf16: half an ulp of the output (one rounding of a float32 result); float32: one ulp
    # (the float32 arithmetic itself rounds several times)
    ulp = 2.0 ** -8 if dtype == jnp.bfloat16 else 2.0 ** -23
    assert np.all(np.abs(whole - exact) <= ulp * np.abs(exact) + 1e-6 * np.abs(exact).max())
