"""Causal attention behind one function, with the kernel chosen per platform.

`attend(q, k, v, ...)` takes q [B,T,N,H] and k, v [B,S,K,H] (N a multiple of K: grouped
query attention) and returns [B,T,N,H] in q's dtype. Query t sits at key slot
`q_offset + t`; it sees key slot s when s <= q_offset + t and, if segment ids are given,
when its segment id equals the key's (packed documents never see each other; id 0 is
padding). Softmax is in float32 in every implementation.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llama_jax.runtime import AttentionImpl

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def resolve(impl: AttentionImpl, dtype) -> AttentionImpl:
    """The implementation AUTO stands for on this platform and dtype."""
    if impl is not AttentionImpl.AUTO:
        return impl
    backend = jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return AttentionImpl.CUDNN  # cuDNN's flash attention takes 16-bit inputs only
    if backend == "tpu":
        return AttentionImpl.SPLASH
    return AttentionImpl.XLA


def attend(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_offset=0,
           impl: AttentionImpl = AttentionImpl.XLA):
    """Causal (grouped-query) attention; see the module docstring for the contract."""
    impl = resolve(impl, q.dtype)
    same_length = q.shape[1] == k.shape[1]
    if impl is AttentionImpl.CUDNN and same_length and isinstance(q_offset, int) and q_offset == 0:
        return _cudnn(q, k, v, q_segment_ids, kv_segment_ids)
    if impl is AttentionImpl.SPLASH and same_length and isinstance(q_offset, int) and q_offset == 0:
        return _splash(q, k, v, q_segment_ids, kv_segment_ids, interpret=jax.default_backend() != "tpu")
    # Decoding (a query block against a longer cache) always takes the XLA path.
    return _xla(q, k, v, q_segment_ids, kv_segment_ids, q_offset)


def causal_mask(t: int, s: int, q_offset, q_segment_ids=None, kv_segment_ids=None):
    """Boolean [B or 1, T, S]: may query t see key s."""
    q_slot = q_offset + jnp.arange(t)[:, None]
    mask = (jnp.arange(s)[None, :] <= q_slot)[None]
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def _xla(q, k, v, q_segment_ids, kv_segment_ids, q_offset):
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)  # [B,T,K,G,H]: query head n uses kv head n // G
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (h ** -0.5)
    mask = causal_mask(t, k.shape[1], q_offset, q_segment_ids, kv_segment_ids)
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def _cudnn(q, k, v, q_segment_ids, kv_segment_ids):
    mask = None
    if q_segment_ids is not None:
        # A dense segment mask costs cuDNN a bias read; unpacked rows should pass no ids.
        mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def _splash(q, k, v, q_segment_ids, kv_segment_ids, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(g)])
    block = min(512, t)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mqa_single_device(mask=mask, block_sizes=sizes, interpret=interpret)
    # Splash wants [heads, T, H] per example and a pre-scaled query; one MQA kernel per kv head.
    qs = (q * (h ** -0.5)).reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,H]
    ks = k.transpose(0, 2, 1, 3)  # [B,K,S,H]
    vs = v.transpose(0, 2, 1, 3)
    if q_segment_ids is None:
        q_segment_ids = kv_segment_ids = jnp.ones((b, t), jnp.int32)

    def one(qe, ke, ve, qseg, kvseg):
        seg = sk.SegmentIds(q=qseg, kv=kvseg)
        return jax.vmap(functools.partial(kernel, segment_ids=seg))(qe, ke, ve)

    out = jax.vmap(one)(qs, ks, vs, q_segment_ids, kv_segment_ids)  # [B,K,G,T,H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
