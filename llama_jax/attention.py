"""Causal attention behind one function, with the kernel chosen per platform.

`attend(q, k, v, ...)` takes q [B,T,N,H] and k, v [B,S,K,H] (N a multiple of K: grouped
query attention) and returns [B,T,N,H] in q's dtype. Query t sits at key slot
`q_offset + t`; it sees key slot s when s <= q_offset + t and, if segment ids are given,
when its segment id equals the key's (packed documents never see each other; id 0 is
padding, and a padding query sees the padding keys up to it, as any segment does). Softmax
is in float32 in every implementation.

Packed rows on cuDNN (docs/attention.md): segment ids that form contiguous runs (each id one
run, ids increasing along the row, padding only as the last run, as data/packing.py makes
them) reach cuDNN as per-row run lengths and offsets (its packed "THD" layout, Hopper and
later), with a fixed budget of `max_segments` runs per row. `checked=True`: a batch with a
row outside that form or over the budget runs the dense-mask kernel instead (`lax.cond`),
exact either way. `checked=False`: the packed kernel with no run-time check; the caller
guarantees every row fits (the model's training path: train/packed_guard.py checks each
batch on the host).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llama_jax.runtime import AttentionImpl

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def resolve(impl: AttentionImpl, dtype, platform: str | None = None) -> AttentionImpl:
    """The implementation AUTO stands for on `platform` (default: this one) and dtype."""
    if impl is not AttentionImpl.AUTO:
        return impl
    backend = platform or jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return AttentionImpl.CUDNN  # cuDNN's flash attention takes 16-bit inputs only
    if backend == "tpu":
        return AttentionImpl.SPLASH
    return AttentionImpl.XLA


def attend(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_offset=0,
           impl: AttentionImpl = AttentionImpl.XLA, max_segments: int | None = None, checked: bool = True):
    """Causal (grouped-query) attention; see the module docstring for the contract.

    `max_segments` (cuDNN with segment ids only): runs per row of the packed kernel, e.g.
    `default_max_segments(T)`; None, 0 or 1: the dense-mask kernel. `checked=False` runs the
    packed kernel without the run-time fallback: only for rows known to fit (the same ids
    for queries and keys, `packed_layout`'s `fits` on every row); any other row is masked
    wrong. The model passes `RunOptions.packed_segments` unchecked: on an H200 (jax 0.11.2)
    the fallback's lax.cond failed to trace inside the model's remat (docs/attention.md)."""
    impl = resolve(impl, q.dtype)
    same_length = q.shape[1] == k.shape[1]
    if impl is AttentionImpl.CUDNN and same_length and isinstance(q_offset, int) and q_offset == 0:
        m = 0 if max_segments is None else max_segments
        # (One slot is not packing to cuDNN: its offsets would be ignored.)
        if q_segment_ids is not None and m >= 2 and packed_supported(q.shape[2], k.shape[2]):
            if not checked:
                seqlen, offsets, _ = packed_layout(q_segment_ids, m)
                return _cudnn_packed(q, k, v, seqlen, offsets)
            return _cudnn_packed_or_dense(q, k, v, q_segment_ids, kv_segment_ids, m)
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


def default_max_segments(t: int) -> int:
    """Runs per row the packed cuDNN kernel is built for: one per 128 tokens, 2 to 16.

    cuDNN allocates its softmax statistics per run slot ([B * M, N, T] float32, M times
    the unpacked size) and launches its grid over every slot, so M is a budget, not free.
    16 slots of a 2048-token row hold documents of 128 tokens on average; the rare row with
    more (a run of tiny files) sends its batch to the dense-mask kernel."""
    return max(2, min(16, t // 128))


def packed_supported(n_heads: int, n_kv_heads: int) -> bool:
    """cuDNN's packed layout here: Hopper or later, and (grouped-query) a jax whose kv offsets
    use the key's head count (jax-ml/jax#39521, released after 0.11.0)."""
    if jax.default_backend() != "gpu":
        return False
    try:  # CUDA devices report "9.0"; anything else (no attribute, a ROCm gfx name) is not Hopper
        major = int(str(getattr(jax.devices()[0], "compute_capability", "0")).split(".")[0])
    except ValueError:
        return False
    return major >= 9 and (n_heads == n_kv_heads or jax.__version_info__ >= (0, 11, 1))


def packed_layout(segment_ids, max_segments: int):
    """[B,T] segment ids -> (seqlen [B,M] int32, offsets [B,M+1] int32, fits [B] bool).

    Runs of equal ids, in order: offsets[b, j] is where run j starts, seqlen[b, j] its length;
    slots past the row's runs hold -1 (cuDNN's "no segment"), as does the last offset column.
    `fits`: the row has at most M runs and its runs are distinct segments (ids increase from
    run to run, padding id 0 only as the last run), so runs and segments mean the same mask.
    Pure jnp, static shapes: jit- and vmap-friendly."""
    b, t = segment_ids.shape
    seg = segment_ids.astype(jnp.int32)
    starts = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    count = jnp.cumsum(starts, axis=1, dtype=jnp.int32)  # runs started up to and including t
    n_runs = count[:, -1]
    # Start of run j = how many tokens lie in runs before it (T past the last run).
    slots = jnp.arange(max_segments + 1, dtype=jnp.int32)
    begin = jnp.sum(count[:, None, :] <= slots[None, :, None], axis=2, dtype=jnp.int32)  # [B, M+1]
    slot = jnp.arange(max_segments, dtype=jnp.int32)[None]
    used = slot < n_runs[:, None]
    seqlen = jnp.where(used, begin[:, 1:] - begin[:, :-1], -1)
    offsets = jnp.concatenate([jnp.where(used, begin[:, :-1], -1), jnp.full((b, 1), -1, jnp.int32)], axis=1)
    # Padding (0) sorts last: in a well-formed row the ids never decrease along t.
    key = jnp.where(seg == 0, jnp.iinfo(jnp.int32).max, seg)
    ordered = jnp.all(key[:, 1:] >= key[:, :-1], axis=1)
    return seqlen, offsets, ordered & (n_runs <= max_segments)


def _cudnn_packed_or_dense(q, k, v, q_segment_ids, kv_segment_ids, max_segments: int):
    seqlen, offsets, fits = packed_layout(q_segment_ids, max_segments)
    # One set of runs serves queries and keys: it needs the same ids on both sides.
    ok = jnp.all(fits) & jnp.all(q_segment_ids == kv_segment_ids)
    # Exact for every batch: one that cuDNN's packed form cannot express takes the dense mask.
    return jax.lax.cond(ok, lambda q, k, v, s, o, qs, ks: _cudnn_packed(q, k, v, s, o),
                        lambda q, k, v, s, o, qs, ks: _cudnn(q, k, v, qs, ks),
                        q, k, v, seqlen, offsets, q_segment_ids, kv_segment_ids)


def _cudnn_packed(q, k, v, seqlen, offsets):
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    # PADDING_CAUSAL: causal within each run, and each run ends at its seqlen (plain CAUSAL
    # would not bound a run by its length). Every token lies in a run, padding included, so
    # every output and gradient row is written.
    return dot_product_attention(q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets,
                                 kv_offsets=offsets, scale=q.shape[-1] ** -0.5,
                                 mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


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
