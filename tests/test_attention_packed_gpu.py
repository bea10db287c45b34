"""cuDNN's packed kernel (segment ids as run lengths and offsets) against the XLA reference.

Skipped unless a Hopper-or-later NVIDIA GPU is the default backend. Inputs are bf16; the
reference is `attention._xla` on the same values upcast to float32 (highest matmul precision,
tests/conftest.py), so the gap is the kernel's own rounding: bf16 outputs (2^-8 relative) and
flash attention's bf16 probabilities before the PV and backward matmuls. Measured over whole
tensors that is a few 1e-3 relative for the output and under 1e-2 for dq/dk/dv; the bounds
below (1e-2, 2e-2) sit above that and far below what a mask error costs: the same rows with
documents seeing each other (MaxText #4476's bug) differ from the reference by > 0.1, which
`test_tolerance_would_catch_a_leak` checks on the very inputs.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import attention as A
from llama_jax.runtime import AttentionImpl

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu" or not A.packed_supported(8, 2),
    reason="cuDNN's packed layout needs a Hopper-or-later NVIDIA GPU (and jax > 0.11.0 for GQA)")

B, T, N, H = 4, 1024, 8, 128
OUT_TOL, GRAD_TOL = 1e-2, 2e-2


def _rows(seed: int, max_docs: int):
    """[B,T] packed rows: 2..max_docs documents of random lengths, ids 1..k, padding tail;
    the last row is all padding (a short final batch padded by pad_batch)."""
    r = np.random.default_rng(seed)
    rows = []
    for _ in range(B - 1):
        k = int(r.integers(2, max_docs + 1))
        cuts = np.sort(r.choice(np.arange(1, T - 16), size=k, replace=False))
        ids = np.zeros(T, np.int32)
        for j, (a, b) in enumerate(zip(np.r_[0, cuts[:-1]], cuts)):
            ids[a:b] = j + 1
        rows.append(ids)  # cuts[-1]..T: padding
    rows.append(np.zeros(T, np.int32))
    return jnp.asarray(np.stack(rows))


def _qkv(kh: int, seed: int = 0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, kh, H), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, kh, H), jnp.float32).astype(jnp.bfloat16)
    g = jax.random.normal(ks[3], (B, T, N, H), jnp.float32)
    return q, k, v, g


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _value_and_grads(fn, q, k, v, g):
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * g), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _reference(q, k, v, g, seg):
    up = lambda x: x.astype(jnp.float32)
    return _value_and_grads(lambda q, k, v: A._xla(q, k, v, seg, seg, 0), up(q), up(k), up(v), g)


def _check(out, grads, ref_out, ref_grads):
    assert _rel(out, ref_out) < OUT_TOL, _rel(out, ref_out)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert _rel(a, b) < GRAD_TOL, (f"d{name}", _rel(a, b))


@pytest.mark.parametrize("kh", [8, 2])
def test_packed_kernel_matches_xla(kh):
    q, k, v, g = _qkv(kh)
    seg = _rows(seed=kh, max_docs=12)
    seqlen, offsets, fits = A.packed_layout(seg, 16)
    assert bool(fits.all())
    out, grads = _value_and_grads(lambda q, k, v: A._cudnn_packed(q, k, v, seqlen, offsets), q, k, v, g)
    ref_out, ref_grads = _reference(q, k, v, g, seg)
    _check(out, grads, ref_out, ref_grads)
    pad = np.asarray(seg) == 0  # padding tokens see earlier padding, as the XLA path says
    assert _rel(np.asarray(out, np.float32)[pad], np.asarray(ref_out)[pad]) < OUT_TOL


@pytest.mark.parametrize("max_segments", [16, 3])
def test_attend_cudnn_is_exact_packed_or_not(max_segments):
    """attend's own selection: 16 slots take the packed kernel; 3 slots are too few for these
    rows, so the batch takes the dense-mask kernel. Both must match the reference."""
    q, k, v, g = _qkv(2, seed=1)
    seg = _rows(seed=5, max_docs=10)
    assert bool(A.packed_layout(seg, max_segments)[2].all()) == (max_segments == 16)
    fn = lambda q, k, v: A.attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                  impl=AttentionImpl.CUDNN, max_segments=max_segments)
    out, grads = _value_and_grads(fn, q, k, v, g)
    _check(out, grads, *_reference(q, k, v, g, seg))


# The backend config is a JSON string inside an MLIR attribute: its quotes may print as \22.
_SLOTS = r'max_seg_per_batch(?:\\22|\\"|")?\s*:\s*%d\b'


@pytest.mark.parametrize("checked", [True, False])
def test_packed_is_the_kernel_attend_runs(checked):
    """The lowered program of attend on packed rows with max_segments M holds the packed cuDNN
    call (M run slots per row in its backend config, no bias); checked=True adds the dense
    fallback (a bias) behind a conditional, checked=False (the model's call) has neither.
    Without max_segments: the dense kernel alone."""
    q, k, v, _ = _qkv(2)
    seg = _rows(seed=2, max_docs=8)
    m = A.default_max_segments(T)

    def hlo(**kw):
        fn = jax.jit(lambda q, k, v, s: A.attend(q, k, v, q_segment_ids=s, kv_segment_ids=s,
                                                 impl=AttentionImpl.CUDNN, **kw))
        return fn.lower(q, k, v, seg).as_text()
    packed = hlo(max_segments=m, checked=checked)
    assert re.search(_SLOTS % m, packed), packed[:3000]
    assert "__cudnn$fmhaSoftmax" in packed
    assert ("__cudnn$fmhaScaleBiasSoftmax" in packed) == checked
    assert ("stablehlo.case" in packed or "stablehlo.if" in packed) == checked
    dense = hlo()
    assert "__cudnn$fmhaScaleBiasSoftmax" in dense and not re.search(_SLOTS % m, dense)
    assert "__cudnn$fmhaSoftmax" not in dense


# On CPUs the same model in bf16 against float32 (XLA path): loss 5e-6, worst gradient leaf 1.6e-2
# relative; documents seeing each other: every gradient leaf off by 0.7 to 1.1.
MODEL_LOSS_TOL, MODEL_GRAD_TOL = 1e-3, 5e-2


def _model_loss_and_grads(batch, run, segment_ids):
    from llama_jax import Llama, ModelConfig
    cfg = ModelConfig.preset("tiny", dim=256, n_heads=4, n_kv_heads=2, max_seq_len=T)  # head dim 64, GQA
    params = Llama(cfg).init(jax.random.PRNGKey(0), batch["tokens"][:1, :8])["params"]

    def loss(params):
        logits = Llama(cfg, run).apply({"params": params}, batch["tokens"], positions=batch["positions"],
                                       segment_ids=segment_ids)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])
    return jax.jit(jax.value_and_grad(loss))(params)


def test_model_with_packed_segments_under_remat():
    """The Transformer with RunOptions.packed_segments=16 (the packed kernel, unchecked) under
    remat dots_flash and unrolled layers, bf16: the loss and every gradient leaf of the same
    model on the XLA path (bf16, so the gap is the attention kernel's). The same run with the
    documents seeing each other (no segment ids) misses the gradient bound by far."""
    from llama_jax import RunOptions
    seg = np.asarray(_rows(seed=3, max_docs=10))
    assert bool(A.packed_layout(jnp.asarray(seg), 16)[2].all())
    starts = np.concatenate([np.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    first = np.maximum.accumulate(np.where(starts, np.arange(T)[None], 0), axis=1)
    r = np.random.default_rng(0)
    tokens = r.integers(3, 512, (B, T + 1))
    batch = {"tokens": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
             "positions": jnp.asarray(np.arange(T)[None] - first, jnp.int32),  # restarting per document
             "loss_mask": jnp.asarray(seg > 0, jnp.float32)}
    run = RunOptions(dtype="bfloat16", remat_policy="dots_flash", layer_loop="unrolled")
    ids = jnp.asarray(seg)
    l_ref, g_ref = _model_loss_and_grads(batch, run.replace(attention_impl="xla"), ids)
    l_ours, g_ours = _model_loss_and_grads(batch, run.replace(attention_impl="cudnn", packed_segments=16), ids)
    assert abs(float(l_ours) - float(l_ref)) < MODEL_LOSS_TOL * abs(float(l_ref)), (l_ours, l_ref)
    rel = jax.tree.leaves(jax.tree.map(_rel, g_ours, g_ref))
    assert max(rel) < MODEL_GRAD_TOL, rel
    _, g_leak = _model_loss_and_grads(batch, run.replace(attention_impl="cudnn"), None)
    assert max(jax.tree.leaves(jax.tree.map(_rel, g_leak, g_ref))) > 4 * MODEL_GRAD_TOL


def test_tolerance_would_catch_a_leak():
    """The bound is meaningful: ignoring the segment ids (plain causal) misses it by far."""
    q, k, v, g = _qkv(2)
    seg = _rows(seed=2, max_docs=12)
    ref_out, _ = _reference(q, k, v, g, seg)
    leak, _ = _reference(q, k, v, g, None)
    assert _rel(leak, ref_out) > 10 * OUT_TOL
