"""The LLaMA decoder in Flax linen.

Einsum letters: B batch, T query length, S key length, D model dim, N query heads,
K kv heads, G = N // K, H head dim, F ffn hidden, V vocab, L layers.

Rotary convention: Meta's interleaved pairs (x[2i], x[2i+1]). Meta's weights load as they
are; Hugging Face's q/k rows are permuted to rotate halves, and interop/mapping.py undoes that
permutation. Nothing in this file knows about Hugging Face.

Parameters, the one schema (layers stacked on a leading L axis by nn.scan;
`RunOptions.layer_loop=UNROLLED` runs the same stacked parameters one layer after another):
  tok_embeddings [V,D]; layers/attention/{wq [L,D,N,H], wk, wv [L,D,K,H], wo [L,N,H,D]};
  layers/feed_forward/{w1, w3 [L,D,F], w2 [L,F,D]}; layers/{attention_norm, ffn_norm}/weight
  [L,D]; norm/weight [D]; output [D,V] (none when `tie_word_embeddings`: tok_embeddings.T).

The layer math (`attention`, `swiglu_gate_up`, `rms_norm`) is shared by these modules and
by cached decoding, which runs it on a per-layer fused runtime form: see inference/decode.py.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llama_jax import kernels
from llama_jax.attention import attend
from llama_jax.config import ModelConfig, RopeScaling
from llama_jax.runtime import AttentionImpl, LayerLoop, RematPolicy, RunOptions

Array = Any
_init = nn.initializers.normal(stddev=0.02)


def _param(module: nn.Module, name: str, shape, axes, param_dtype, init=_init):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(param_dtype))


class RMSNorm(nn.Module):
    dim: int
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = _param(self, "weight", (self.dim,), ("embed",), self.param_dtype, nn.initializers.ones)
        return rms_norm(x, w, self.eps)


def rms_norm(x: Array, w: Array, eps: float) -> Array:
    x32 = x.astype(jnp.float32)  # statistics in float32, as Meta's reference does
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * w.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Rotary inverse frequencies [H/2], float32, computed as the reference code does."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    # theta**exponent correctly rounded to float32, then a float32 reciprocal: bit for bit
    # what the reference code computes (angles reach 1e3+ rad, so ulps matter).
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    inv_freq = np.float32(1.0) / power
    if scaling is None:
        return inv_freq
    # LLaMA 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    # float32 throughout, with `c / x` as reciprocal(x) * c, the way the reference evaluates it.
    f32, s = np.float32, scaling
    orig = s.original_max_position_embeddings
    wavelen = (f32(1) / inv_freq) * f32(2 * math.pi)
    scaled = np.where(wavelen > orig / s.low_freq_factor, inv_freq / f32(s.factor), inv_freq).astype(f32)
    smooth = ((f32(1) / wavelen) * f32(orig) - f32(s.low_freq_factor)) / f32(s.high_freq_factor - s.low_freq_factor)
    blended = (f32(1) - smooth) * scaled / f32(s.factor) + smooth * scaled
    medium = ~(wavelen < orig / s.high_freq_factor) & ~(wavelen > orig / s.low_freq_factor)
    return np.where(medium, blended, scaled).astype(f32)


def rope_tables(positions: Array, config: ModelConfig) -> tuple[Array, Array]:
    """(sin, cos), float32 [B,T,H/2], for integer positions [B,T]."""
    inv_freq = jnp.asarray(rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: Array, sin: Array, cos: Array) -> Array:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B,T,heads,H] by the tables' angles.

    (a, b) -> (a cos - b sin, a sin + b cos), written as x * cos + swap(x) * (-sin, sin):
    one elementwise pass. (Stacking the two halves instead made XLA emit a concatenate
    kernel that ran at a third of the memory bandwidth on an H200.)
    """
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)  # [B,T,heads,H/2,2]
    signed_sin = jnp.stack([-sin, sin], axis=-1)[:, :, None]  # [B,T,1,H/2,2]
    out = pairs * cos[:, :, None, :, None] + pairs[..., ::-1] * signed_sin
    return out.reshape(x.shape).astype(x.dtype)


class LayerInputs(NamedTuple):
    """What every layer reads besides its activations: rotary tables and attention masks.

    sin, cos: [B,T,H/2] float32. segment_ids: [B,T] (None: one document per row).
    Cached decoding only: kv_segment_ids [B,S] (the key slots' ids) and cache_index (the
    slot of the block's first token).
    """
    sin: Array
    cos: Array
    segment_ids: Array | None = None
    kv_segment_ids: Array | None = None
    cache_index: Any = None


def stack_gate_up(w1: Array, w3: Array) -> Array:
    """w1 | w3 as one [..., D, 2, F] weight: the gate and up projections as one matmul."""
    xp = np if isinstance(w1, np.ndarray) else jnp
    return xp.stack([w1, w3], axis=-2)


def stack_qkv(wq: Array, wk: Array, wv: Array) -> Array:
    """wq | wk | wv [D,N,H], [D,K,H] as one [D,K,G+2,H] weight: per kv head its G query heads,
    then its key and value head (`split_qkv` undoes it on the projection)."""
    xp = np if isinstance(wq, np.ndarray) else jnp
    d, n, h = wq.shape
    kh = wk.shape[1]
    return xp.concatenate([wq.reshape(d, kh, n // kh, h), wk[:, :, None], wv[:, :, None]], axis=2)


def split_qkv(qkv: Array, n_heads: int) -> tuple[Array, Array, Array]:
    """q [B,T,N,H], k, v [B,T,K,H] from the projection [B,T,K,G+2,H] by `stack_qkv`'s weight."""
    g = qkv.shape[-2] - 2
    return qkv[..., :g, :].reshape(*qkv.shape[:2], n_heads, qkv.shape[-1]), qkv[..., g, :], qkv[..., g + 1, :]


def attention(q, k, v, wo, inputs: LayerInputs, impl: AttentionImpl, cache=None):
    """Rotary, attention and the output projection -> (y [B,T,D], new (k, v) cache or None).

    With `cache` ((k, v) [B,S,K,H]), this block's k, v are written at slot
    inputs.cache_index and the queries attend to every slot (XLA path).
    """
    dt = q.dtype
    q = nn.with_logical_constraint(apply_rope(q, inputs.sin, inputs.cos), ("batch", "seq", "heads", "head_dim"))
    k = nn.with_logical_constraint(apply_rope(k, inputs.sin, inputs.cos), ("batch", "seq", "kv_heads", "head_dim"))
    v = nn.with_logical_constraint(v, ("batch", "seq", "kv_heads", "head_dim"))
    if cache is None:
        out = attend(q, k, v, q_segment_ids=inputs.segment_ids, kv_segment_ids=inputs.segment_ids, impl=impl)
    else:
        i = inputs.cache_index
        ck, cv = cache
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, i, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, i, 0, 0))
        out = attend(q, ck.astype(dt), cv.astype(dt), q_segment_ids=inputs.segment_ids,
                     kv_segment_ids=inputs.kv_segment_ids, q_offset=i)
        cache = (ck, cv)
    out = checkpoint_name(out, "attention_out")
    y = jnp.einsum("BTNH,NHD->BTD", out, wo.astype(dt))
    return checkpoint_name(y, "attention_proj"), cache


def swiglu_gate_up(gate_up: Array, w2: Array, interpret: bool) -> Array:
    """w2(silu(gate) * up) from the stacked projection gate_up [B,T,2,F] (one-kernel backward)."""
    gate_up = nn.with_logical_constraint(gate_up, kernels.GATE_UP_AXES)
    return _down(kernels.swiglu(gate_up, kernels.GATE_UP_AXES, interpret), w2)


def _down(hidden: Array, w2: Array) -> Array:
    hidden = nn.with_logical_constraint(hidden, ("batch", "seq", "mlp"))
    return checkpoint_name(jnp.einsum("BTF,FD->BTD", hidden, w2.astype(hidden.dtype)), "mlp_out")


class Attention(nn.Module):
    config: ModelConfig
    run: RunOptions

    @nn.compact
    def __call__(self, x, inputs: LayerInputs):
        c, r = self.config, self.run
        d, n, kh, h = c.dim, c.n_heads, c.kv_heads, c.head_dim
        dt = r.dtype
        wq = _param(self, "wq", (d, n, h), ("embed", "heads", "head_dim"), r.param_dtype)
        wk = _param(self, "wk", (d, kh, h), ("embed", "kv_heads", "head_dim"), r.param_dtype)
        wv = _param(self, "wv", (d, kh, h), ("embed", "kv_heads", "head_dim"), r.param_dtype)
        wo = _param(self, "wo", (n, h, d), ("heads", "head_dim", "embed"), r.param_dtype)
        q = checkpoint_name(jnp.einsum("BTD,DNH->BTNH", x, wq.astype(dt)), "query_proj")
        k = checkpoint_name(jnp.einsum("BTD,DKH->BTKH", x, wk.astype(dt)), "key_proj")
        v = checkpoint_name(jnp.einsum("BTD,DKH->BTKH", x, wv.astype(dt)), "value_proj")
        return attention(q, k, v, wo, inputs, r.attention_impl)[0]


class FeedForward(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x).

    `run.fuse_gate_up`: w1 and w3 stacked at run time (`stack_gate_up`), so both run as one
    matmul and SwiGLU's backward pass is one kernel on GPUs (`kernels.swiglu`); the
    parameters stay w1 and w3.
    """
    config: ModelConfig
    run: RunOptions

    @nn.compact
    def __call__(self, x):
        c, r = self.config, self.run
        d, f = c.dim, c.ffn_hidden_dim
        dt = r.dtype
        w1 = _param(self, "w1", (d, f), ("embed", "mlp"), r.param_dtype)
        w3 = _param(self, "w3", (d, f), ("embed", "mlp"), r.param_dtype)
        w2 = _param(self, "w2", (f, d), ("mlp", "embed"), r.param_dtype)
        if r.fuse_gate_up:
            gate_up = jnp.einsum("BTD,DJF->BTJF", x, stack_gate_up(w1, w3).astype(dt))
            return swiglu_gate_up(checkpoint_name(gate_up, "mlp_gate_up"), w2, r.interpret_kernels)
        gate = checkpoint_name(jnp.einsum("BTD,DF->BTF", x, w1.astype(dt)), "mlp_gate")
        up = checkpoint_name(jnp.einsum("BTD,DF->BTF", x, w3.astype(dt)), "mlp_up")
        return _down(nn.silu(gate) * up, w2)


class Block(nn.Module):
    """Pre-norm decoder layer, shaped for nn.scan: (x, inputs) -> (x, None)."""
    config: ModelConfig
    run: RunOptions

    @nn.compact
    def __call__(self, x, inputs: LayerInputs):
        c, r = self.config, self.run
        x = x + Attention(c, r, name="attention")(RMSNorm(c.dim, c.norm_eps, r.param_dtype, name="attention_norm")(x),
                                                  inputs)
        x = x + FeedForward(c, r, name="feed_forward")(RMSNorm(c.dim, c.norm_eps, r.param_dtype, name="ffn_norm")(x))
        return nn.with_logical_constraint(x, ("batch", "seq", "embed")), None


def _dots_and_flash_saveable(prim, *args, **params) -> bool:
    # cuDNN's attention forward is one primitive with its softmax statistics as a second
    # output; saving both lets the backward pass skip re-running the forward kernel.
    if prim.name.startswith("dot_product_attention_fwd"):
        return True
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)


_REMAT_POLICIES = {
    RematPolicy.FULL: jax.checkpoint_policies.nothing_saveable,
    RematPolicy.DOTS: jax.checkpoint_policies.dots_saveable,
    RematPolicy.DOTS_NO_BATCH: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    RematPolicy.MINIMAL: jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "attention_out", "mlp_gate", "mlp_up", "mlp_gate_up"),
    RematPolicy.DOTS_FLASH: _dots_and_flash_saveable,
}


def _stacked_blocks(config: ModelConfig, run: RunOptions):
    block = Block
    if run.remat_policy is not RematPolicy.NONE:
        block = nn.remat(Block, policy=_REMAT_POLICIES[run.remat_policy], prevent_cse=False)
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast,), length=config.n_layers, unroll=run.scan_unroll,
                   metadata_params={nn.PARTITION_NAME: "layers"})


def _unrolled_blocks(config: ModelConfig, run: RunOptions, layers, x, inputs: LayerInputs):
    """The scan's computation with the loop unrolled: layer l reads slice l of the stacked params.

    Under nn.scan, every activation the backward pass keeps is copied into an [L, ...]
    buffer (zeroed first) and each parameter gradient into another; unrolled, they stay
    where they were computed. `lax.split` (whose transpose is a concatenate) cuts the
    stacked params, so the gradients come back stacked without summing padded copies.

    Remat: XLA may merge a recomputation with the forward value it repeats (no
    `prevent_cse`), trading some memory for time (on an H200, 7B FSDP: +6 GB, 1% faster),
    except under remat "full", whose point is memory.
    """
    def block(p, x, inputs):
        return Block(config, run, parent=None).apply({"params": p}, x, inputs)[0]
    policy = run.remat_policy
    if policy is not RematPolicy.NONE:
        block = jax.checkpoint(block, policy=_REMAT_POLICIES[policy], prevent_cse=policy is RematPolicy.FULL)
    n = config.n_layers
    leaves, treedef = jax.tree.flatten(layers)
    pieces = [jax.lax.split(a, (1,) * n, axis=0) for a in leaves]
    for i in range(n):
        x = block(treedef.unflatten([p[i][0] for p in pieces]), x, inputs)
    return x


class Llama(nn.Module):
    """LLaMA: `apply({"params": p}, tokens)` -> float32 logits [B,T,V].

    Optional `positions` and `segment_ids` ([B,T] int) describe packed rows. `run`: how to
    execute it (dtypes, kernels, remat, layer loop). Cached decoding: `inference.decode`.
    """
    config: ModelConfig
    run: RunOptions = RunOptions()

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None):
        c, r = self.config, self.run
        b, t = tokens.shape
        if positions is None:
            positions = default_positions(b, t, 0)
        emb = _param(self, "tok_embeddings", (c.vocab_size, c.dim), ("vocab", "embed"), r.param_dtype)
        x = embed(emb, tokens, r.dtype)
        inputs = LayerInputs(*rope_tables(positions, c), segment_ids=segment_ids)
        if r.layer_loop is LayerLoop.UNROLLED and not self.is_initializing():
            x = _unrolled_blocks(c, r, nn.unbox(self.variables["params"]["layers"]), x, inputs)
        else:
            x, _ = _stacked_blocks(c, r)(c, r, name="layers")(x, inputs)
        x = RMSNorm(c.dim, c.norm_eps, r.param_dtype, name="norm")(x)
        if c.tie_word_embeddings:  # Llama 3.2: one stored matrix, read twice, no logit scaling
            out = emb.T  # [D,V], sharded (embed, vocab) like an untied output
        else:
            out = _param(self, "output", (c.dim, c.vocab_size), ("embed", "vocab"), r.param_dtype)
        return project_logits(x, out)


def default_positions(batch: int, length: int, start) -> Array:
    """Positions [B,T] int32: start, start + 1, ... in every row."""
    return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))


def embed(table: Array, tokens: Array, dtype) -> Array:
    """Token embeddings [B,T,D] in the compute dtype, from the table [V,D]."""
    x = jnp.take(table, tokens, axis=0).astype(dtype)
    return nn.with_logical_constraint(x, ("batch", "seq", "embed"))


def output_matrix(params: dict, config: ModelConfig) -> Array:
    """The output projection [D,V]: params["output"], or tok_embeddings.T when tied."""
    return params["tok_embeddings"].T if config.tie_word_embeddings else params["output"]


def project_logits(x: Array, output: Array) -> Array:
    """float32 logits [B,T,V] from normalised activations [B,T,D] and the output matrix [D,V]."""
    return nn.with_logical_constraint(output_logits(x, output.astype(x.dtype)), ("batch", "seq", "vocab"))


@jax.custom_vjp
def output_logits(x, w):
    """float32 logits x @ w ("BTD,DV->BTV"), whose backward stays in x's dtype.

    The float32 cotangent would otherwise turn both backward matmuls (the largest in a
    small model) into float32 matmuls: it is cast to the compute dtype first.
    """
    return jnp.einsum("BTD,DV->BTV", x, w, preferred_element_type=jnp.float32)


def _output_logits_fwd(x, w):
    return output_logits(x, w), (x, w)


def _output_logits_bwd(res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = jnp.einsum("BTV,DV->BTD", g, w, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum("BTD,BTV->DV", x, g, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


output_logits.defvjp(_output_logits_fwd, _output_logits_bwd)


def param_shapes(config: ModelConfig, param_dtype=jnp.float32):
    """Abstract params (ShapeDtypeStructs, with logical partitioning boxes) without allocating."""
    model = Llama(config, RunOptions(param_dtype=param_dtype))
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return jax.eval_shape(lambda r, t: model.init(r, t), jax.random.PRNGKey(0), tokens)["params"]
