"""kernels.cast_transpose (FP8 quantise into both layouts in one pass) against XLA's
expression: bit for bit, on a GPU through the Triton kernel, elsewhere in interpret mode;
and fp8_dot / fp8_dot_delayed through the kernel against the XLA path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import RunOptions, fp8, kernels

MODE = "gpu" if jax.default_backend() == "gpu" else "interpret"
KERNEL = fp8.Fp8Recipe(cast="interpret" if MODE == "interpret" else "auto")  # the kernel where shapes tile


def _bits(a):
    return np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint8))


def _operand(shape, dtype, seed=0):
    """Normal values spread over 2^-20 .. 2^6 plus exact zeros and both signs: after scaling
    some saturate at fmax, some land in FP8's subnormals, some flush to zero."""
    r = np.random.default_rng(seed)
    x = r.standard_normal(shape) * np.exp2(r.integers(-20, 7, shape))
    x[r.random(shape) < 0.05] = 0.0
    return jnp.asarray(x, jnp.float32).astype(dtype)


@pytest.mark.parametrize("q_dtype", [fp8.E4M3, fp8.E5M2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(64, 96), (256, 32), (48, 40)])  # last: does not tile, XLA's fallback
def test_cast_transpose_equals_xla_bit_for_bit(shape, dtype, q_dtype):
    x = _operand(shape, dtype)
    # a scale that pushes the largest values past fmax: saturation is part of the contract
    scale = fp8.scale_from_amax(fp8.amax_of(x), q_dtype) * 4.0
    q, qt = jax.jit(lambda x: fp8.quantize_both(x, q_dtype, scale, KERNEL))(x)
    want_q, want_qt = fp8.quantize_both(x, q_dtype, scale, fp8.Fp8Recipe(cast="xla"))
    assert q.shape == shape and qt.shape == shape[::-1] and q.dtype == qt.dtype == q_dtype
    np.testing.assert_array_equal(_bits(q), _bits(want_q))
    np.testing.assert_array_equal(_bits(qt), _bits(want_qt))
    np.testing.assert_array_equal(_bits(qt), _bits(q).T)
    *_, amax = jax.jit(lambda x: fp8.quantize_both(x, q_dtype, scale, KERNEL, with_amax=True))(x)
    assert amax.dtype == jnp.float32 and float(amax) == float(fp8.amax_of(x))
    assert not np.isnan(np.asarray(q, np.float32)).any()  # saturated, never nan
    assert np.abs(np.asarray(q, np.float32)).max() == fp8.fp8_max(q_dtype)


def test_cast_transpose_equals_quantize():
    """The kernel itself gives fp8.quantize's values, transposed; a shape that does not tile
    is refused (fp8.quantize_both then runs XLA's expression)."""
    x = _operand((64, 96), jnp.bfloat16, seed=3)
    scale = fp8.scale_from_amax(fp8.amax_of(x), fp8.E4M3)
    q, qt = kernels.cast_transpose(x, scale, fp8.E4M3, interpret=MODE == "interpret")
    np.testing.assert_array_equal(_bits(q), _bits(fp8.quantize(x, fp8.E4M3, scale)))
    np.testing.assert_array_equal(_bits(qt), _bits(fp8.quantize(x, fp8.E4M3, scale)).T)
    assert kernels.cast_transpose_tiles((64, 96)) == (64, 32) and kernels.cast_transpose_tiles((48, 40)) is None
    with pytest.raises(ValueError, match=r"\(48, 40\) does not tile"):
        kernels.cast_transpose(jnp.zeros((48, 40)), scale, fp8.E4M3, interpret=True)


def test_kernel_mode():
    x = jnp.zeros((32, 32), jnp.bfloat16)
    assert kernels.fp8_kernel_mode(x, interpret=True) == "interpret"
    assert kernels.fp8_kernel_mode(x, interpret=False) == ("gpu" if jax.default_backend() == "gpu"
                                                           and jax.device_count() == 1 else None)


def test_run_options_choose_the_cast():
    fp8_run = RunOptions(matmul_precision="fp8")
    assert fp8.recipe_of(fp8_run).cast == "auto"
    assert fp8.recipe_of(fp8_run.replace(interpret_kernels=True)).cast == "interpret"
    assert fp8.recipe_of(fp8_run.replace(fp8_cast_kernel=False, interpret_kernels=True)).cast == "xla"
    assert RunOptions.from_dict(fp8_run.replace(fp8_cast_kernel=False).to_dict()).fp8_cast_kernel is False
    with pytest.raises(ValueError, match="fp8_cast_kernel"):
        RunOptions(fp8_cast_kernel="yes")
    with pytest.raises(ValueError, match="cast"):
        fp8.Fp8Recipe(cast="triton")


@pytest.mark.parametrize("delayed", [False, True])
def test_fp8_dot_through_the_kernel_gives_exact_results(delayed):
    """Forward and both gradients through the kernel and through XLA's fusions. Operands are
    small integers and scales powers of two, so every FP8 value and every GEMM sum is exact:
    a wrong value or layout from the kernel would show as a wrong result. Each result is the
    exact one rounded to bf16 (the GEMM's output type) or, where XLA folds the rescale into the
    GEMM's float32 epilogue (seen on an H200 for the float32 weight gradient), exact. On a
    CPU the two paths run the same dots: bit for bit, the new amax histories too."""
    r = np.random.default_rng(1)
    x, g = (jnp.asarray(r.integers(-7, 8, s), jnp.bfloat16) for s in ((128, 64), (128, 96)))
    w = jnp.asarray(r.integers(-7, 8, (64, 96)), jnp.float32)
    state = fp8.Fp8State(jnp.asarray(r.integers(1, 8, (3, 4)), jnp.float32))

    def grads(cast):
        recipe = fp8.Fp8Recipe(cast=cast, power_of_two=True)
        if delayed:
            f = lambda x, w, s: fp8.fp8_dot_delayed(x, w, s, recipe)  # noqa: E731
            y, vjp = jax.vjp(f, x, w, state)
        else:
            y, vjp = jax.vjp(lambda x, w: fp8.fp8_dot(x, w, recipe), x, w)
        return jax.tree.leaves((y, vjp(g)))

    kernel = "interpret" if MODE == "interpret" else "auto"
    got, want = jax.jit(lambda: grads(kernel))(), jax.jit(lambda: grads("xla"))()
    assert len(got) == (4 if delayed else 3)  # y, dx, dw (and the new histories)
    xf, wf, gf = (np.asarray(a, np.float32) for a in (x, w, g))
    for a, b, exact in zip(got, want, (xf @ wf, gf @ wf.T, xf.T @ gf)):
        rounded = exact.astype(jnp.bfloat16).astype(np.float32)
        for res in (np.asarray(a, np.float32), np.asarray(b, np.float32)):
            assert np.all((res == exact) | (res == rounded)), np.abs(res - exact).max()
    if MODE == "interpret":
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
