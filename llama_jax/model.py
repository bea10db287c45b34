"""The LLaMA decoder in Flax linen.

Einsum letters: B batch, T query length, S key length, D model dim, N query heads,
K kv heads, G = N // K, H head dim, F ffn hidden, V vocab, L layers.

Rotary convention: Meta's interleaved pairs (x[2i], x[2i+1]). Meta's weights load as they
are; Hugging Face's q/k rows are permuted to rotate halves, and weights.py undoes that
permutation. Nothing in this file knows about Hugging Face.

Parameters (layers stacked on a leading L axis by nn.scan; `ModelConfig.layer_loop="unrolled"`
runs the same stacked parameters one layer after another instead of through the scan):
  tok_embeddings [V,D]; layers/attention/{wq [L,D,N,H], wk, wv [L,D,K,H], wo [L,N,H,D]};
  layers/feed_forward/{w1, w3 [L,D,F], w2 [L,F,D]}; layers/{attention_norm, ffn_norm}/weight
  [L,D]; norm/weight [D]; output [D,V] (none when `tie_word_embeddings`: tok_embeddings.T).

Decoding runs the same `Block`s in a per-layer runtime form: see decode.py.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llama_jax import attention, kernels
from llama_jax.config import LayerLoop, ModelConfig, RematPolicy, RopeScaling

Array = Any
_init = nn.initializers.normal(stddev=0.02)


def _param(module: nn.Module, name: str, shape, axes, param_dtype, init=_init):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(param_dtype))


class RMSNorm(nn.Module):
    dim: int
    eps: float
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        w = _param(self, "weight", (self.dim,), ("embed",), self.param_dtype, nn.initializers.ones)
        x32 = x.astype(jnp.float32)  # statistics in float32, as Meta's reference does
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
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


class Attention(nn.Module):
    """`fused`: the decode runtime form (see `decode.split_layers`), one projection wqkv [D,K,G+2,H]."""
    config: ModelConfig
    fused: bool = False

    @nn.compact
    def __call__(self, x, sin, cos, segment_ids, cache=None, cache_index=None, kv_segment_ids=None):
        c = self.config
        d, n, kh, h = c.dim, c.n_heads, c.kv_heads, c.head_dim
        dt = jnp.dtype(c.dtype)
        if self.fused:
            g = n // kh
            wqkv = _param(self, "wqkv", (d, kh, g + 2, h), ("embed", "kv_heads", None, "head_dim"), c.param_dtype)
            qkv = jnp.einsum("BTD,DKJH->BTKJH", x, wqkv.astype(dt))
            q = qkv[..., :g, :].reshape(*x.shape[:2], n, h)
            k, v = qkv[..., g, :], qkv[..., g + 1, :]
        else:
            wq = _param(self, "wq", (d, n, h), ("embed", "heads", "head_dim"), c.param_dtype)
            wk = _param(self, "wk", (d, kh, h), ("embed", "kv_heads", "head_dim"), c.param_dtype)
            wv = _param(self, "wv", (d, kh, h), ("embed", "kv_heads", "head_dim"), c.param_dtype)
            q = checkpoint_name(jnp.einsum("BTD,DNH->BTNH", x, wq.astype(dt)), "query_proj")
            k = checkpoint_name(jnp.einsum("BTD,DKH->BTKH", x, wk.astype(dt)), "key_proj")
            v = checkpoint_name(jnp.einsum("BTD,DKH->BTKH", x, wv.astype(dt)), "value_proj")
        wo = _param(self, "wo", (n, h, d), ("heads", "head_dim", "embed"), c.param_dtype)
        q = nn.with_logical_constraint(apply_rope(q, sin, cos), ("batch", "seq", "heads", "head_dim"))
        k = nn.with_logical_constraint(apply_rope(k, sin, cos), ("batch", "seq", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "seq", "kv_heads", "head_dim"))
        if cache is None:
            out = attention.attend(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                                   impl=c.attention_impl)
            new_cache = None
        else:
            ck, cv = cache  # [B,S,K,H] each: write this block at slot cache_index, attend to all
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
            out = attention.attend(q, ck.astype(dt), cv.astype(dt), q_segment_ids=segment_ids,
                                   kv_segment_ids=kv_segment_ids, q_offset=cache_index)
            new_cache = (ck, cv)
        out = checkpoint_name(out, "attention_out")
        y = jnp.einsum("BTNH,NHD->BTD", out, wo.astype(dt))
        return checkpoint_name(y, "attention_proj"), new_cache


class FeedForward(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x).

    `fused`: the decode runtime form (see `decode.split_layers`), one projection w13 [D,2,F].
    `config.fuse_gate_up`: w1 and w3 stacked at run time into that [D,2,F] form, so both
    run as one matmul, and SwiGLU's backward pass is one kernel on GPUs (`kernels.swiglu`);
    the parameters stay w1 and w3.
    """
    config: ModelConfig
    fused: bool = False

    @nn.compact
    def __call__(self, x):
        c = self.config
        d, f = c.dim, c.ffn_hidden_dim
        dt = jnp.dtype(c.dtype)
        if self.fused:
            w13 = _param(self, "w13", (d, 2, f), ("embed", None, "mlp"), c.param_dtype)
        else:
            w1 = _param(self, "w1", (d, f), ("embed", "mlp"), c.param_dtype)
            w3 = _param(self, "w3", (d, f), ("embed", "mlp"), c.param_dtype)
        w2 = _param(self, "w2", (f, d), ("mlp", "embed"), c.param_dtype)
        if self.fused or c.fuse_gate_up:
            if not self.fused:
                w13 = jnp.stack([w1, w3], axis=1)
            gate_up = checkpoint_name(jnp.einsum("BTD,DJF->BTJF", x, w13.astype(dt)), "mlp_gate_up")
            gate_up = nn.with_logical_constraint(gate_up, kernels.GATE_UP_AXES)
            hidden = kernels.swiglu(gate_up, kernels.GATE_UP_AXES)
        else:
            gate = checkpoint_name(jnp.einsum("BTD,DF->BTF", x, w1.astype(dt)), "mlp_gate")
            up = checkpoint_name(jnp.einsum("BTD,DF->BTF", x, w3.astype(dt)), "mlp_up")
            hidden = nn.silu(gate) * up
        hidden = nn.with_logical_constraint(hidden, ("batch", "seq", "mlp"))
        return checkpoint_name(jnp.einsum("BTF,FD->BTD", hidden, w2.astype(dt)), "mlp_out")


class Block(nn.Module):
    """Pre-norm decoder layer, shaped for nn.scan: (x, layer_cache) -> (x, new_layer_cache).

    `fused`: the per-layer decode form's parameters (`decode.split_layers`), same math.
    """
    config: ModelConfig
    fused: bool = False

    @nn.compact
    def __call__(self, x, cache, sin, cos, segment_ids, cache_index, kv_segment_ids):
        c = self.config
        h, new_cache = Attention(c, self.fused, name="attention")(
            RMSNorm(c.dim, c.norm_eps, c.param_dtype, name="attention_norm")(x),
            sin, cos, segment_ids, cache, cache_index, kv_segment_ids)
        x = x + h
        x = x + FeedForward(c, self.fused, name="feed_forward")(
            RMSNorm(c.dim, c.norm_eps, c.param_dtype, name="ffn_norm")(x))
        return nn.with_logical_constraint(x, ("batch", "seq", "embed")), new_cache


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


def _stacked_blocks(config: ModelConfig):
    block = Block
    if config.remat_policy is not RematPolicy.NONE:
        block = nn.remat(Block, policy=_REMAT_POLICIES[config.remat_policy], prevent_cse=False)
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                   length=config.n_layers, unroll=config.scan_unroll,
                   metadata_params={nn.PARTITION_NAME: "layers"})


def _unrolled_blocks(config: ModelConfig, layers, x, sin, cos, segment_ids):
    """The scan's computation with the loop unrolled: layer l reads slice l of the stacked params.

    Under nn.scan, every activation the backward pass keeps is copied into an [L, ...]
    buffer (zeroed first) and each parameter gradient into another; unrolled, they stay
    where they were computed. `lax.split` (whose transpose is a concatenate) cuts the
    stacked params, so the gradients come back stacked without summing padded copies.

    Remat: XLA may merge a recomputation with the forward value it repeats (no
    `prevent_cse`), trading some memory for time (on an H200, 7B FSDP: +6 GB, 1% faster),
    except under remat "full", whose point is memory.
    """
    def block(p, x, sin, cos, segment_ids):
        return Block(config, parent=None).apply({"params": p}, x, None, sin, cos, segment_ids, None, None)[0]
    policy = config.remat_policy
    if policy is not RematPolicy.NONE:
        block = jax.checkpoint(block, policy=_REMAT_POLICIES[policy], prevent_cse=policy is RematPolicy.FULL)
    n = config.n_layers
    leaves, treedef = jax.tree.flatten(layers)
    pieces = [jax.lax.split(a, (1,) * n, axis=0) for a in leaves]
    for i in range(n):
        x = block(treedef.unflatten([p[i][0] for p in pieces]), x, sin, cos, segment_ids)
    return x


class Llama(nn.Module):
    """LLaMA: `apply({"params": p}, tokens)` -> float32 logits [B,T,V].

    Optional `positions` and `segment_ids` ([B,T] int) describe packed rows; with
    `cache` (from `init_cache`) and `cache_index` (the slot of tokens[:, 0]) it decodes
    and returns (logits, new_cache).
    """
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, cache_index=None):
        c = self.config
        b, t = tokens.shape
        if positions is None:
            positions = default_positions(b, t, 0 if cache_index is None else cache_index)
        emb = _param(self, "tok_embeddings", (c.vocab_size, c.dim), ("vocab", "embed"), c.param_dtype)
        x = embed(emb, tokens, c)
        sin, cos = rope_tables(positions, c)
        layer_cache, kv_segment_ids = None, None
        if cache is not None:
            segment_ids, kv_segment_ids = cache_segment_ids(cache["segment_ids"], segment_ids, cache_index, b, t)
            layer_cache = (cache["k"], cache["v"])
        if c.layer_loop is LayerLoop.UNROLLED and cache is None and not self.is_initializing():
            x = _unrolled_blocks(c, nn.unbox(self.variables["params"]["layers"]), x, sin, cos, segment_ids)
        else:
            x, new_layer_cache = _stacked_blocks(c)(c, name="layers")(
                x, layer_cache, sin, cos, segment_ids, cache_index, kv_segment_ids)
        x = RMSNorm(c.dim, c.norm_eps, c.param_dtype, name="norm")(x)
        if c.tie_word_embeddings:  # Llama 3.2: one stored matrix, read twice, no logit scaling
            out = emb.T  # [D,V], sharded (embed, vocab) like an untied output
        else:
            out = _param(self, "output", (c.dim, c.vocab_size), ("embed", "vocab"), c.param_dtype)
        logits = project_logits(x, out)
        if cache is None:
            return logits
        k, v = new_layer_cache
        return logits, {"k": k, "v": v, "segment_ids": kv_segment_ids}


def default_positions(batch: int, length: int, start) -> Array:
    """Positions [B,T] int32: start, start + 1, ... in every row."""
    return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))


def cache_segment_ids(cached, segment_ids, cache_index, batch: int, length: int):
    """(query segment ids [B,T], key segment ids [B,S] with the new block written at cache_index)."""
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
    return segment_ids, jax.lax.dynamic_update_slice(cached, segment_ids, (0, cache_index))


def embed(table: Array, tokens: Array, config: ModelConfig) -> Array:
    """Token embeddings [B,T,D] in the compute dtype, from the table [V,D]."""
    x = jnp.take(table, tokens, axis=0).astype(jnp.dtype(config.dtype))
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


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache: k, v [L,B,S,K,H] and the key slots' segment ids [B,S] (0: empty)."""
    shape = (config.n_layers, batch, max_len, config.kv_heads, config.head_dim)
    dt = jnp.dtype(dtype or config.dtype)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32)}


def param_shapes(config: ModelConfig):
    """Abstract params (ShapeDtypeStructs, with logical partitioning boxes) without allocating."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return jax.eval_shape(lambda r, t: Llama(config).init(r, t), jax.random.PRNGKey(0), tokens)["params"]
