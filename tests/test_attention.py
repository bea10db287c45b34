"""The attention kernels against a direct float64 computation of the definition."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import attention as A
from llama_jax.runtime import AttentionImpl


def _reference(q, k, v, seg=None, q_offset=0):
    """softmax(q k^T / sqrt(H) + mask) v in float64, query head n using kv head n // G."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    k = np.repeat(k, n // kh, axis=2)
    v = np.repeat(v, n // kh, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
    allowed = np.arange(s)[None, :] <= (q_offset + np.arange(t))[:, None]
    allowed = np.broadcast_to(allowed, (b, t, s))
    if seg is not None:
        qs, ks = seg
        allowed = allowed & (np.asarray(qs)[:, :, None] == np.asarray(ks)[:, None, :])
    scores = np.where(allowed[:, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def _inputs(b=2, t=256, n=4, kh=2, h=32, s=None, seed=0):
    r = np.random.default_rng(seed)
    s = s or t
    f = lambda *shape: jnp.asarray(r.standard_normal(shape), jnp.float32)
    return f(b, t, n, h), f(b, s, kh, h), f(b, s, kh, h)


def _segments(b, t):
    cut = [t // 3, t // 2][:b]
    return jnp.asarray(np.stack([np.where(np.arange(t) < c, 1, 2) for c in cut]), jnp.int32)


@pytest.mark.parametrize("kh", [4, 2, 1])
@pytest.mark.parametrize("impl", [AttentionImpl.XLA, AttentionImpl.SPLASH])
def test_matches_definition(impl, kh):
    q, k, v = _inputs(kh=kh)
    seg = _segments(2, 256)
    out = A.attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl=impl)
    np.testing.assert_allclose(out, _reference(q, k, v, (seg, seg)), rtol=1e-5, atol=1e-5)
    out = A.attend(q, k, v, impl=impl)
    np.testing.assert_allclose(out, _reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_query_block_against_longer_cache():
    q, k, v = _inputs(t=5, s=40)
    kv_seg = jnp.asarray(np.where(np.arange(40) < 20, 1, 0)[None].repeat(2, 0), jnp.int32)
    q_seg = jnp.ones((2, 5), jnp.int32)
    out = A.attend(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_offset=15)
    np.testing.assert_allclose(out, _reference(q, k, v, (q_seg, kv_seg), q_offset=15), rtol=1e-5, atol=1e-5)


def test_splash_gradients_match_xla():
    q, k, v = _inputs(b=1, t=128)
    seg = _segments(1, 128)

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(A.attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl=impl)))

    gx = jax.grad(loss(AttentionImpl.XLA), argnums=(0, 1, 2))(q, k, v)
    gs = jax.grad(loss(AttentionImpl.SPLASH), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(gx, gs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_auto_is_xla_on_cpu():
    assert A.resolve(AttentionImpl.AUTO, jnp.bfloat16) is AttentionImpl.XLA or jax.default_backend() != "cpu"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_matches_definition(packed):
    q, k, v = (x.astype(jnp.bfloat16) for x in _inputs(t=512, h=128, n=8))
    seg = _segments(2, 512) if packed else None
    out = A.attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl=AttentionImpl.CUDNN)
    ref = _reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                     None if seg is None else (seg, seg))
    err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    assert err < 1e-2, err  # bf16 inputs: ~3e-3 expected
