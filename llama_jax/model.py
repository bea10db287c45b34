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
FP8 with delayed scaling adds the "fp8" collection: per weight matmul an amax history [L,3,history]
(fp8.Fp8State) at layers/attention/{wq,wk,wv,wo}, layers/feed_forward/{w1,w3 or fused w1_w3,w2}.

The layer math (`attention`, `swiglu_gate_up`, `rms_norm`) is shared by these modules and
by cached decoding, which runs it on a per-layer fused runtime form: see inference/decode.py.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llama_jax import fp8, kernels
from llama_jax.attention import attend
from llama_jax import lora as lora_lib
from llama_jax.config import ModelConfig
from llama_jax.rope import apply_rope, rope_inv_freq, rope_tables  # noqa: F401 (model.rope_* names kept)
from llama_jax.runtime import AttentionImpl, LayerLoop, RematPolicy, RunOptions, checkpoint_policy

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


def project(spec: str, x: Array, w: Array, dtype, recipe: fp8.Fp8Recipe | None = None,
            state: fp8.Fp8State | None = None) -> Array:
    """`jnp.einsum(spec, x, w.astype(dtype))`; with a `recipe`, FP8 (`state`: delayed scaling)."""
    if recipe is not None:
        return fp8.fp8_einsum(spec, x, w, recipe, state).astype(jnp.result_type(x.dtype, dtype))
    return jnp.einsum(spec, x, w.astype(dtype))


def attention(q, k, v, wo, inputs: LayerInputs, impl: AttentionImpl, cache=None, wo_extra=None,
              recipe: fp8.Fp8Recipe | None = None, packed_segments: int = 0,
              wo_state: fp8.Fp8State | None = None):
    """Rotary, attention and the output projection -> (y [B,T,D], new (k, v) cache or None).

    With `cache` ((k, v) [B,S,K,H]), this block's k, v are written at slot
    inputs.cache_index and the queries attend to every slot (XLA path). `wo_extra`: a
    function of the attention output [B,T,N,H] added to y (a LoRA adapter's term on wo).
    `packed_segments` >= 2 (uncached, with segment ids): cuDNN's packed kernel with that many
    runs per row, unchecked: every row must fit (train/packed_guard.py checks on the host).
    """
    dt = q.dtype
    q = nn.with_logical_constraint(apply_rope(q, inputs.sin, inputs.cos), ("batch", "seq", "heads", "head_dim"))
    k = nn.with_logical_constraint(apply_rope(k, inputs.sin, inputs.cos), ("batch", "seq", "kv_heads", "head_dim"))
    v = nn.with_logical_constraint(v, ("batch", "seq", "kv_heads", "head_dim"))
    if cache is None:
        out = attend(q, k, v, q_segment_ids=inputs.segment_ids, kv_segment_ids=inputs.segment_ids, impl=impl,
                     max_segments=packed_segments, checked=False)
    else:
        i = inputs.cache_index
        ck, cv = cache
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, i, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, i, 0, 0))
        out = attend(q, ck.astype(dt), cv.astype(dt), q_segment_ids=inputs.segment_ids,
                     kv_segment_ids=inputs.kv_segment_ids, q_offset=i)
        cache = (ck, cv)
    out = checkpoint_name(out, "attention_out")
    y = project("BTNH,NHD->BTD", out, wo, dt, recipe, wo_state)
    if wo_extra is not None:
        y = y + wo_extra(out)
    return checkpoint_name(y, "attention_proj"), cache


def swiglu_gate_up(gate_up: Array, w2: Array, interpret: bool) -> Array:
    """w2(silu(gate) * up) from the stacked projection gate_up [B,T,2,F] (one-kernel backward)."""
    gate_up = nn.with_logical_constraint(gate_up, kernels.GATE_UP_AXES)
    return _down(kernels.swiglu(gate_up, kernels.GATE_UP_AXES, interpret), w2)


def _down(hidden: Array, w2: Array, recipe: fp8.Fp8Recipe | None = None,
          state: fp8.Fp8State | None = None) -> Array:
    hidden = nn.with_logical_constraint(hidden, ("batch", "seq", "mlp"))
    return checkpoint_name(project("BTF,FD->BTD", hidden, w2, hidden.dtype, recipe, state), "mlp_out")


def _fp8_state(module: nn.Module, name: str) -> fp8.Fp8State | None:
    """Call site `name`'s delayed-scaling state (made at init), or None: current scaling or no FP8."""
    r = module.run
    if not r.fp8_delayed or not (module.is_initializing() or module.has_variable("fp8", name)):
        return None
    init = nn.with_logical_partitioning(lambda: fp8.init_fp8_state(r.fp8_history).amax_history, (None, None))
    return fp8.Fp8State(module.variable("fp8", name, init).value)


def _plus_adapter(module: nn.Module, lora, name: str, x: Array, y: Array) -> Array:
    """y + the LoRA adapter's term on input x when `name` is adapted, else y.

    The adapters are the "lora" collection (`lora.init_adapters`' tree: the params' paths,
    sliced per layer like them); they are not created at init, so the base schema stays one.
    Dropout on x (peft's lora_dropout, one mask per target) when a "dropout" rng is given.
    """
    if lora is None or name not in lora.targets or module.is_initializing():
        return y
    f = module.get_variable("lora", name)
    if f is None:
        raise ValueError(f"Llama(lora=...) needs the adapters: apply({{'params': p, 'lora': adapters}}) "
                         f"(missing {module.scope.path_text}/{name})")
    if lora.dropout > 0 and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / jnp.asarray(1.0 - lora.dropout, x.dtype), jnp.zeros_like(x))
    return y + lora_lib.forward(name, x, f["a"], f["b"], lora.scale)


class Attention(nn.Module):
    config: ModelConfig
    run: RunOptions
    lora: lora_lib.LoraConfig | None = None

    @nn.compact
    def __call__(self, x, inputs: LayerInputs):
        c, r, lo = self.config, self.run, self.lora
        d, n, kh, h = c.dim, c.n_heads, c.kv_heads, c.head_dim
        dt, p = r.dtype, fp8.recipe_of(r)
        wq = _param(self, "wq", (d, n, h), ("embed", "heads", "head_dim"), r.param_dtype)
        wk = _param(self, "wk", (d, kh, h), ("embed", "kv_heads", "head_dim"), r.param_dtype)
        wv = _param(self, "wv", (d, kh, h), ("embed", "kv_heads", "head_dim"), r.param_dtype)
        wo = _param(self, "wo", (n, h, d), ("heads", "head_dim", "embed"), r.param_dtype)
        s = {name: _fp8_state(self, name) for name in ("wq", "wk", "wv", "wo")}
        q = _plus_adapter(self, lo, "wq", x, project("BTD,DNH->BTNH", x, wq, dt, p, s["wq"]))
        k = _plus_adapter(self, lo, "wk", x, project("BTD,DKH->BTKH", x, wk, dt, p, s["wk"]))
        v = _plus_adapter(self, lo, "wv", x, project("BTD,DKH->BTKH", x, wv, dt, p, s["wv"]))
        q, k, v = checkpoint_name(q, "query_proj"), checkpoint_name(k, "key_proj"), checkpoint_name(v, "value_proj")
        wo_extra = None
        if lo is not None and "wo" in lo.targets:
            wo_extra = lambda out: _plus_adapter(self, lo, "wo", out, 0)  # noqa: E731
        return attention(q, k, v, wo, inputs, r.attention_impl, wo_extra=wo_extra, recipe=p,
                         packed_segments=r.packed_segments, wo_state=s["wo"])[0]


class FeedForward(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x).

    `run.fuse_gate_up`: w1 and w3 stacked at run time (`stack_gate_up`), so both run as one
    matmul and SwiGLU's backward is one kernel on GPUs (`kernels.swiglu`; in FP8 XLA's, which absorbs
    the GEMM outputs' rescales); the parameters stay w1 and w3 (LoRA terms add to the stacked one).
    """
    config: ModelConfig
    run: RunOptions
    lora: lora_lib.LoraConfig | None = None

    @nn.compact
    def __call__(self, x):
        c, r, lo = self.config, self.run, self.lora
        d, f = c.dim, c.ffn_hidden_dim
        dt, p = r.dtype, fp8.recipe_of(r)
        w1 = _param(self, "w1", (d, f), ("embed", "mlp"), r.param_dtype)
        w3 = _param(self, "w3", (d, f), ("embed", "mlp"), r.param_dtype)
        w2 = _param(self, "w2", (f, d), ("mlp", "embed"), r.param_dtype)
        s2 = _fp8_state(self, "w2")
        down = lambda hidden: _plus_adapter(self, lo, "w2", hidden, _down(hidden, w2, p, s2))  # noqa: E731
        if r.fuse_gate_up:
            gate_up = project("BTD,DJF->BTJF", x, stack_gate_up(w1, w3), dt, p, _fp8_state(self, "w1_w3"))
            if lo is not None and ({"w1", "w3"} & set(lo.targets)):
                zero = jnp.zeros(gate_up.shape[:2] + gate_up.shape[3:], gate_up.dtype)
                gate_up = gate_up + jnp.stack([_plus_adapter(self, lo, "w1", x, zero),
                                               _plus_adapter(self, lo, "w3", x, zero)], axis=2)
            gate_up = nn.with_logical_constraint(checkpoint_name(gate_up, "mlp_gate_up"), kernels.GATE_UP_AXES)
            return down(kernels.swiglu(gate_up, kernels.GATE_UP_AXES, r.interpret_kernels, kernel=p is None))
        s1, s3 = _fp8_state(self, "w1"), _fp8_state(self, "w3")
        gate = checkpoint_name(_plus_adapter(self, lo, "w1", x, project("BTD,DF->BTF", x, w1, dt, p, s1)),
                               "mlp_gate")
        up = checkpoint_name(_plus_adapter(self, lo, "w3", x, project("BTD,DF->BTF", x, w3, dt, p, s3)), "mlp_up")
        return down(nn.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm decoder layer, shaped for nn.scan: (x, inputs) -> (x, None)."""
    config: ModelConfig
    run: RunOptions
    lora: lora_lib.LoraConfig | None = None

    @nn.compact
    def __call__(self, x, inputs: LayerInputs):
        c, r, lo = self.config, self.run, self.lora
        x = x + Attention(c, r, lora=lo, name="attention")(
            RMSNorm(c.dim, c.norm_eps, r.param_dtype, name="attention_norm")(x), inputs)
        x = x + FeedForward(c, r, lora=lo, name="feed_forward")(
            RMSNorm(c.dim, c.norm_eps, r.param_dtype, name="ffn_norm")(x))
        return nn.with_logical_constraint(x, ("batch", "seq", "embed")), None


def _stacked_blocks(config: ModelConfig, run: RunOptions):
    block = Block
    if run.remat_policy is not RematPolicy.NONE:
        block = nn.remat(Block, policy=checkpoint_policy(run.remat_policy), prevent_cse=False)
    return nn.scan(block, variable_axes={"params": 0, "lora": 0, "fp8": 0},
                   split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast,), length=config.n_layers, unroll=run.scan_unroll,
                   metadata_params={nn.PARTITION_NAME: "layers"})


def _unrolled_blocks(config: ModelConfig, run: RunOptions, lora, layers, x, inputs: LayerInputs, dropout_rng=None):
    """The scan's computation with the loop unrolled: layer l reads slice l of the stacked params.

    Under nn.scan, every activation the backward pass keeps is copied into an [L, ...]
    buffer (zeroed first) and each parameter gradient into another; unrolled, they stay
    where they were computed. `lax.split` (whose transpose is a concatenate) cuts the
    stacked params, so the gradients come back stacked without summing padded copies.

    Remat: XLA may merge a recomputation with the forward value it repeats (no
    `prevent_cse`), trading some memory for time (on an H200, 7B FSDP: +6 GB, 1% faster),
    except under remat "full" and "attention", whose point is memory.

    With LoRA the base is frozen: its slices are cut inside each layer's remat, so the
    backward pass cuts them again instead of holding a copy of every layer's weights
    (`lax.split` of an undifferentiated base is a copy of all of it, live from the first
    layer's forward to its backward: +16 GB on the 8B shape).

    `layers`: {"params": ..., "lora": ..., "fp8": ...} (the adapters only with `lora`, the
    delayed-scaling state only with it), each stacked.
    """
    frozen = layers["params"] if lora is not None else None
    trained = {k: v for k, v in layers.items() if frozen is None or k != "params"}

    def block(i, frozen, p, x, inputs, rng):
        if frozen is not None:
            p = {**p, "params": jax.tree.map(lambda a: a[i], frozen)}
        rngs = {} if rng is None else {"dropout": rng}
        return Block(config, run, lora=lora, parent=None).apply(p, x, inputs, rngs=rngs)[0]
    policy = run.remat_policy
    if policy is not RematPolicy.NONE:
        block = jax.checkpoint(block, policy=checkpoint_policy(policy), static_argnums=(0,),
                               prevent_cse=policy in (RematPolicy.FULL, RematPolicy.ATTENTION))
    n = config.n_layers
    leaves, treedef = jax.tree.flatten(trained)
    pieces = [jax.lax.split(a, (1,) * n, axis=0) for a in leaves]
    for i in range(n):
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
        x = block(i, frozen, treedef.unflatten([p[i][0] for p in pieces]), x, inputs, rng)
    return x


class Llama(nn.Module):
    """LLaMA: `apply({"params": p}, tokens)` -> float32 logits [B,T,V] (`logits=False`: see __call__).

    Optional `positions` and `segment_ids` ([B,T] int) describe packed rows. `run`: how to
    execute it (dtypes, kernels, remat, layer loop). Cached decoding: `inference.decode`.

    `lora`: LoRA adapters on the targeted projections, unmerged: `apply({"params": p,
    "lora": adapters}, tokens)` with `lora.init_adapters`' tree; a "dropout" rng turns on
    the adapters' dropout. Not created by `init`: the params are the base's schema.
    """
    config: ModelConfig
    run: RunOptions = RunOptions()
    lora: lora_lib.LoraConfig | None = None

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, logits: bool = True):
        """float32 logits [B,T,V]; with `logits=False`, (the final normalised activations
        [B,T,D], the output matrix [D,V]) in the compute dtype, for a loss that never holds
        the [B,T,V] logits (losses.head_cross_entropy)."""
        c, r = self.config, self.run
        b, t = tokens.shape
        if positions is None:
            positions = default_positions(b, t, 0)
        emb = _param(self, "tok_embeddings", (c.vocab_size, c.dim), ("vocab", "embed"), r.param_dtype)
        x = embed(emb, tokens, r.dtype)
        inputs = LayerInputs(*rope_tables(positions, c), segment_ids=segment_ids)
        if r.layer_loop is LayerLoop.UNROLLED and not self.is_initializing():
            layers = {k: nn.unbox(v["layers"]) for k, v in self.variables.items() if k in ("params", "lora", "fp8")}
            rng = self.make_rng("dropout") if self.lora is not None and self.has_rng("dropout") else None
            x = _unrolled_blocks(c, r, self.lora, layers, x, inputs, rng)
        else:
            x, _ = _stacked_blocks(c, r)(c, r, lora=self.lora, name="layers")(x, inputs)
        x = RMSNorm(c.dim, c.norm_eps, r.param_dtype, name="norm")(x)
        if c.tie_word_embeddings:  # Llama 3.2: one stored matrix, read twice, no logit scaling
            out = emb.T  # [D,V], sharded (embed, vocab) like an untied output
        else:
            out = _param(self, "output", (c.dim, c.vocab_size), ("embed", "vocab"), r.param_dtype)
        if not logits:
            return x, nn.with_logical_constraint(out.astype(x.dtype), ("embed", "vocab"))
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
