"""Segment ids -> cuDNN's packed layout (run lengths and offsets), on any backend.

The packed kernel itself needs a Hopper GPU (tests/test_attention_packed_gpu.py); what it is
given is plain jnp and checked here: the runs it describes must mask exactly as the ids do.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import attention as A
from llama_jax.data.packing import pack_documents


def _layout(rows, m):
    seqlen, offsets, fits = jax.jit(A.packed_layout, static_argnums=1)(jnp.asarray(rows, jnp.int32), m)
    return np.asarray(seqlen), np.asarray(offsets), np.asarray(fits)


def _mask_from_runs(seqlen, offsets, t):
    """The [B,T,T] mask cuDNN's PADDING_CAUSAL packed kernel applies: causal within each run,
    a token outside every run sees nothing (and is seen by nothing)."""
    b, m = seqlen.shape
    run = np.full((b, t), -1)
    for i in range(b):
        for j in range(m):
            if offsets[i, j] >= 0 and seqlen[i, j] >= 0:
                run[i, offsets[i, j]:offsets[i, j] + seqlen[i, j]] = j
    same = (run[:, :, None] == run[:, None, :]) & (run[:, :, None] >= 0)
    return same & np.tril(np.ones((t, t), bool))[None]


def test_runs_lengths_offsets_and_edge_cases():
    rows = [[1, 1, 1, 2, 2, 3, 0, 0],   # three documents, padding tail
            [1] * 8,                    # one segment
            [0] * 8,                    # all padding (pad_batch's rows)
            [1, 2, 3, 4, 0, 0, 0, 0],   # exactly max segments (4 documents + padding = 5 runs)
            [1, 2, 3, 0, 0, 0, 0, 0]]   # 4 runs = max segments
    seqlen, offsets, fits = _layout(rows, 4)
    np.testing.assert_array_equal(seqlen, [[3, 2, 1, 2], [8, -1, -1, -1], [8, -1, -1, -1],
                                           [1, 1, 1, 1], [1, 1, 1, 5]])
    np.testing.assert_array_equal(offsets, [[0, 3, 5, 6, -1], [0, -1, -1, -1, -1], [0, -1, -1, -1, -1],
                                            [0, 1, 2, 3, -1], [0, 1, 2, 3, -1]])
    np.testing.assert_array_equal(fits, [True, True, True, False, True])  # row 3: 5 runs > 4
    assert seqlen.dtype == offsets.dtype == np.int32  # cuDNN's custom call takes int32 only


def test_rows_that_runs_cannot_express_do_not_fit():
    rows = [[1, 1, 2, 2, 1, 1, 0, 0],   # id 1 comes back: one segment, two runs
            [0, 0, 1, 1, 2, 2, 2, 2],   # padding before documents
            [1, 1, 0, 0, 2, 2, 0, 0],   # padding in the middle
            [2, 2, 1, 1, 1, 1, 1, 1]]   # ids decrease: still distinct runs, but not the packer's form
    assert not _layout(rows, 8)[2].any()


def test_max_segments_one_is_plain_causal_per_row():
    seqlen, offsets, fits = _layout([[5] * 6, [1, 1, 1, 0, 0, 0]], 1)
    np.testing.assert_array_equal(seqlen, [[6], [3]])
    np.testing.assert_array_equal(offsets, [[0, -1], [0, -1]])
    np.testing.assert_array_equal(fits, [True, False])


@pytest.mark.parametrize("seed", range(3))
def test_runs_mask_exactly_as_segment_ids_on_packed_rows(seed):
    """Rows from the real packer (documents of random lengths, split across rows, a padded
    last row): wherever the layout fits, its runs give the ids' mask, padding included."""
    r = np.random.default_rng(seed)
    t = 64
    docs = [list(r.integers(3, 50, r.integers(0, 40))) for _ in range(30)]
    rows = pack_documents(docs, t, bos=1, eos=2)
    seg = np.stack([row["segment_ids"] for row in rows])
    assert (seg == 0).any() and (seg.max(axis=1) > 2).any()  # a padding tail and several documents
    seqlen, offsets, fits = _layout(seg, 8)
    assert fits.all(), seg.max(axis=1)
    want = np.asarray(A.causal_mask(t, t, 0, jnp.asarray(seg), jnp.asarray(seg)))
    np.testing.assert_array_equal(_mask_from_runs(seqlen, offsets, t), want)


def test_every_token_lies_in_a_run():
    """cuDNN writes no output (and no gradient) for a token outside every run: padding must be
    a run too, or its rows would hold whatever the buffer held."""
    seqlen, offsets, fits = _layout([[1, 1, 2, 0, 0, 0], [0] * 6], 4)
    assert fits.all()
    covered = (seqlen * (seqlen > 0)).sum(axis=1)
    np.testing.assert_array_equal(covered, [6, 6])


def test_default_budget_and_cpu_path():
    assert A.default_max_segments(2048) == 16 and A.default_max_segments(8192) == 16
    assert A.default_max_segments(512) == 4 and A.default_max_segments(8) == 2
    assert not A.packed_supported(8, 8) or jax.default_backend() == "gpu"


def _runs_as_ids(seqlen, offsets, t):
    """Run index per token (what the packed kernel masks by), -1 - t outside every run."""
    pos = jnp.arange(t)[None, None, :]
    start, length = offsets[:, :-1, None], seqlen[:, :, None]
    inside = (start >= 0) & (pos >= start) & (pos < start + length)  # [B, M, T]
    return jnp.where(inside.any(1), jnp.argmax(inside, axis=1), -1 - jnp.arange(t)[None])


@pytest.mark.parametrize("rows,packed", [
    ([[1] * 10 + [2] * 20 + [0] * 2, [1] * 31 + [0]], True),        # fits: the packed branch
    ([[1] * 10 + [2] * 10 + [1] * 12, [0] * 32], False),            # id 1 twice: the dense branch
    ([list(range(1, 17)) * 2, [1] * 32], False),                    # 32 runs > 8: the dense branch
])
def test_attend_cudnn_selects_an_exact_branch(monkeypatch, rows, packed):
    """attend's cuDNN dispatch on a CPU, with each kernel replaced by the XLA path over the mask
    it applies (the packed one masks by runs): the branch taken at run time must be exact,
    values and gradients, and a row the runs cannot express must not take the packed one."""
    monkeypatch.setattr(A, "packed_supported", lambda n, k: True)
    monkeypatch.setattr(A, "_cudnn_packed", lambda q, k, v, s, o: A._xla(
        q, k, v, _runs_as_ids(s, o, q.shape[1]), _runs_as_ids(s, o, q.shape[1]), 0))
    monkeypatch.setattr(A, "_cudnn", lambda q, k, v, qs, ks: A._xla(q, k, v, qs, ks, 0))
    seg = jnp.asarray(rows, jnp.int32)
    assert bool(A.packed_layout(seg, 8)[2].all()) == packed
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((2, 32, 4, 8), (2, 32, 2, 8), (2, 32, 2, 8)))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) ** 2)
    ours = lambda q, k, v: A.attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl=A.AttentionImpl.CUDNN,
                                    max_segments=8)
    ref = lambda q, k, v: A._xla(q, k, v, seg, seg, 0)
    np.testing.assert_allclose(jax.jit(ours)(q, k, v), ref(q, k, v), rtol=1e-6, atol=1e-6)
    g_ours = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loop,remat,slots", [("unrolled", "dots_flash", 4), ("scan", "full", 4),
                                              ("unrolled", "dots_flash", 2)])
def test_model_with_the_cudnn_dispatch_matches_xla(monkeypatch, loop, remat, slots):
    """The run-time selection inside the model's remat and layer loops (cond under checkpoint
    and scan), with the same stand-in kernels: loss and gradients equal the XLA model's, on
    the packed branch (4 slots) and on the dense one (2 slots: a row has 3 documents)."""
    from llama_jax import Llama, ModelConfig, RunOptions
    _stand_in_kernels(monkeypatch)
    from llama_jax import model as model_module
    # The model's own call is unchecked (RunOptions.packed_segments); this is attend's checked path.
    monkeypatch.setattr(model_module, "attend",
                        lambda *a, **kw: A.attend(*a, **{**kw, "max_segments": slots, "checked": True}))
    batch = _model_batch()
    assert bool(A.packed_layout(batch["segment_ids"], slots)[2].all()) == (slots == 4)
    (l_ours, g_ours), (l_ref, g_ref) = (_model_loss_and_grads(batch, impl, remat, loop) for impl in ("cudnn", "xla"))
    np.testing.assert_allclose(l_ours, l_ref, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_ours, g_ref)


def _stand_in_kernels(monkeypatch):
    """cuDNN's kernels on CPUs: the XLA path over the mask each applies (packed: by runs)."""
    monkeypatch.setattr(A, "packed_supported", lambda n, k: True)
    monkeypatch.setattr(A, "_cudnn_packed", lambda q, k, v, s, o: A._xla(
        q, k, v, _runs_as_ids(s, o, q.shape[1]), _runs_as_ids(s, o, q.shape[1]), 0))
    monkeypatch.setattr(A, "_cudnn", lambda q, k, v, qs, ks: A._xla(q, k, v, qs, ks, 0))


def _model_batch():
    """Two packed rows of 32 tokens: at most 3 documents (+ padding) in a row."""
    rows = pack_documents([list(range(3, 3 + n)) for n in (5, 20, 9, 40, 3, 12)], 32, bos=1, eos=2)
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def _model_loss_and_grads(batch, impl, remat, loop, packed_segments=0):
    from llama_jax import Llama, ModelConfig, RunOptions
    cfg = ModelConfig.preset("tiny")
    params = Llama(cfg).init(jax.random.PRNGKey(0), batch["tokens"])["params"]

    def loss(params):
        run = RunOptions(attention_impl=impl, remat_policy=remat, layer_loop=loop, packed_segments=packed_segments)
        logits = Llama(cfg, run).apply({"params": params}, batch["tokens"], positions=batch["positions"],
                                       segment_ids=batch["segment_ids"])
        logp = jax.nn.log_softmax(logits)
        return -jnp.sum(jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0] * batch["loss_mask"])
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("loop,remat", [("unrolled", "dots_flash"), ("scan", "full")])
def test_model_with_packed_segments_runs_the_packed_kernel_unchecked(monkeypatch, loop, remat):
    """RunOptions.packed_segments: the model calls the packed kernel with no run-time check
    (stand-in kernels): exact on rows that fit its slots (4), and wrong on rows that do not
    (2 slots, 3 documents), which is why train/packed_guard.py checks every batch first."""
    _stand_in_kernels(monkeypatch)
    calls = []
    packed = A._cudnn_packed
    monkeypatch.setattr(A, "_cudnn_packed", lambda *a: calls.append(1) or packed(*a))
    monkeypatch.setattr(A, "_cudnn_packed_or_dense", lambda *a: pytest.fail("the model took the checked path"))
    batch = _model_batch()
    l_ref, g_ref = _model_loss_and_grads(batch, "xla", remat, loop)
    l_ours, g_ours = _model_loss_and_grads(batch, "cudnn", remat, loop, packed_segments=4)
    assert calls  # traced through the packed kernel
    np.testing.assert_allclose(l_ours, l_ref, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_ours, g_ref)
    l_short, _ = _model_loss_and_grads(batch, "cudnn", remat, loop, packed_segments=2)
    assert abs(float(l_short) - float(l_ref)) > 100 * 1e-6 * abs(float(l_ref))  # 100x the tolerance above


def test_attend_unchecked_has_no_cond(monkeypatch):
    """checked=False: the packed kernel alone in the program (no lax.cond to trace under
    remat); checked=True: the selection between the two kernels."""
    _stand_in_kernels(monkeypatch)
    seg = jnp.asarray([[1] * 10 + [2] * 20 + [0] * 2, [1] * 31 + [0]], jnp.int32)
    q = k = v = jnp.ones((2, 32, 2, 8), jnp.float32)
    for checked, has_cond in ((False, False), (True, True)):
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: A.attend(
            q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl=A.AttentionImpl.CUDNN, max_segments=8,
            checked=checked))(q, k, v))
        assert ("cond[" in jaxpr) == has_cond, (checked, jaxpr[:2000])
