"""TrainState, sharded init from shapes, and the pure train/eval steps.

`model` is `Llama(config, run_options)`. Shapes first: `jax.eval_shape` gives the
abstract state with its logical axis names,
`sharding.logical_to_shardings` turns them into NamedShardings, and a jitted init with
those `out_shardings` creates every parameter directly in its shard: no process ever
holds the full unsharded parameters.

FP8 with delayed scaling (`RunOptions.fp8_delayed`): `TrainState.fp8` holds the model's
"fp8" collection (amax histories, llama_jax/fp8.py). The step differentiates the loss with
respect to it too; that "gradient" is the updated state (the overwrite-with-gradient
convention), stored in its place, never seen by the optimizer. With micro-batches the state
is threaded through them (each forward and backward pushes one amax per tensor). A fresh
run's all-zero histories are filled by one calibrating forward and backward before its first
step (`make_train_step`; a second, smaller compile).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from llama_jax import fp8 as fp8_lib, lora as lora_lib, losses, sharding
from llama_jax.model import Llama

BATCH_AXES = ("batch", "seq")


@flax.struct.dataclass
class TrainState:
    step: jax.Array      # int32 scalar: optimizer updates applied so far
    params: Any          # float32 master parameters: the trainable ones (with LoRA: the adapters)
    opt_state: Any       # optax state (float32)
    fp8: Any = flax.struct.field(default_factory=dict)  # delayed FP8 scaling's state; {} otherwise


def _init_fn(model: Llama, tx: optax.GradientTransformation) -> Callable:
    def init(rng):
        if model.lora is not None:  # only the adapters train: the base is an input of the step
            params = jax.tree.map(nn.LogicallyPartitioned, lora_lib.init_adapters(model.config, model.lora, rng),
                                  lora_lib.adapter_axes(model.lora))
        else:
            # Batch 1: the forward pass init traces is dead code for the outputs (params only).
            params = model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          fp8=fresh_fp8(model))
    return init


def fresh_fp8(model: Llama) -> dict:
    """The "fp8" collection of a fresh run (zero amax histories, in logical-axis boxes);
    {} unless the model runs FP8 with delayed scaling."""
    if not model.run.fp8_delayed:
        return {}
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["fp8"]
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)


def base_shardings(model: Llama, mesh: Mesh, dtype="float32"):
    """(abstract base params, their NamedShardings) for a LoRA run's frozen base."""
    shapes = Llama(model.config, model.run.replace(param_dtype=jnp.dtype(dtype))).init
    abstract = jax.eval_shape(shapes, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return abstract, sharding.logical_to_shardings(abstract, mesh)


def init_base(model: Llama, mesh: Mesh, rng, dtype="float32"):
    """A random base for a LoRA run without `init_from` (tests, benchmarks), in its shards."""
    abstract, shardings = base_shardings(model, mesh, dtype)
    base = Llama(model.config, model.run.replace(param_dtype=jnp.dtype(dtype)))
    return jax.jit(lambda r: nn.unbox(base.init(r, jnp.zeros((1, 1), jnp.int32))["params"]),
                   out_shardings=shardings)(rng)


def abstract_state(model: Llama, tx: optax.GradientTransformation) -> TrainState:
    """The state's shapes, boxed with logical axis names (optimizer moments mirror params)."""
    return jax.eval_shape(_init_fn(model, tx), jax.random.PRNGKey(0))


def state_shardings(abstract: TrainState, mesh: Mesh) -> TrainState:
    """NamedShardings for every leaf of an abstract (boxed) state; scalars are replicated."""
    return sharding.logical_to_shardings(abstract, mesh)


def init_state(model: Llama, tx: optax.GradientTransformation, mesh: Mesh, rng) -> TrainState:
    """A freshly initialised state, each array created directly in its shard."""
    shardings = state_shardings(abstract_state(model, tx), mesh)
    init = _init_fn(model, tx)
    return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)


def state_from_params(params, tx: optax.GradientTransformation, shardings: TrainState,
                      model: Llama | None = None) -> TrainState:
    """A step-0 state around given (already sharded) params: fine-tuning from a checkpoint.
    `model`: the run's model, whose delayed-scaling state (if any) starts fresh."""
    def make(p):
        p = jax.tree.map(lambda x: x.astype(jnp.float32), p)  # float32 master copy
        fp8 = {} if model is None else nn.unbox(fresh_fp8(model))
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), fp8=fp8)
    return jax.jit(make, in_shardings=(shardings.params,), out_shardings=shardings)(params)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Where a [B, T] batch lives: rows over ("data", "fsdp"), positions unsplit."""
    return sharding.logical_sharding(mesh, BATCH_AXES)


def token_losses(model: Llama, params, batch, base=None, rng=None, fp8=None) -> tuple[jax.Array, jax.Array]:
    """(sum of masked next-token cross-entropies, number of counted tokens), float32.

    With LoRA (`model.lora`), `params` are the adapters and `base` the frozen params; `rng`
    drives the adapters' dropout (None: none). `fp8`: the delayed-scaling state (None or {}:
    none given, so a delayed-scaling model scales FP8 currently)."""
    variables = {"params": params} if model.lora is None else {"params": base, "lora": params}
    if fp8:
        variables["fp8"] = fp8
    rngs = {} if rng is None or model.lora is None or model.lora.dropout == 0 else {"dropout": rng}
    # The loss straight from the final activations: the [B,T,V] logits exist one chunk at a time.
    x, out = model.apply(variables, batch["tokens"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"], logits=False, rngs=rngs)
    return losses.head_cross_entropy(x, out, batch["targets"], batch["loss_mask"])


def _micro_batches(batch, n: int):
    """[B, T] -> [n, B/n, T] taking rows with stride n, so every device's contiguous block
    of rows feeds every micro-batch (no device idles in any of them)."""
    def split(x):
        b = x.shape[0]
        if b % n:
            raise ValueError(f"batch of {b} rows does not split into {n} micro-batches")
        return jnp.swapaxes(x.reshape(b // n, n, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def _gradients(model: Llama, params, batch, micro_batches: int, base=None, rng=None, fp8=None):
    """(mean loss, its gradient, token count, new fp8 state) over the whole batch, by token
    count of the loss mask.

    Micro-batch m contributes grad(sum_m / N) with N the whole batch's token count, so
    the sum over micro-batches is exactly the gradient of the global mean. The fp8 state's
    "gradient" is its update (fp8.py): passed on from micro-batch to micro-batch, never summed.
    """
    fp8 = {} if fp8 is None else fp8
    total = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    def part(p, f, mb, r):
        s, _ = token_losses(model, p, mb, base, r, f)  # (base: closed over, so never differentiated)
        return s / total
    grad_fn = jax.value_and_grad(part, argnums=(0, 1))
    if micro_batches == 1:
        loss, (grads, fp8) = grad_fn(params, fp8, batch, rng)
        return loss, grads, total, fp8
    def body(carry, i_mb):
        acc, f = carry
        i, mb = i_mb
        loss, (g, f) = grad_fn(params, f, mb, None if rng is None else jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, acc, (loss, g)), f), None
    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    ((loss, grads), fp8), _ = jax.lax.scan(body, (zeros, fp8),
                                           (jnp.arange(micro_batches), _micro_batches(batch, micro_batches)))
    return loss, grads, total, fp8


def make_train_step(model: Llama, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, shardings: TrainState, micro_batches: int = 1, base=None,
                    seed: int = 0) -> Callable:
    """jitted `(state, batch) -> (state, metrics)`; the state is donated.

    metrics: loss (mean over counted tokens), tokens (counted), grad_norm (before
    clipping), lr (the rate this update used). With LoRA, `base` (sharded frozen params)
    is an argument of every call, not donated, never differentiated; dropout's rng is
    (seed, step), so a resumed run draws the same masks. Delayed FP8 scaling: the state's
    amax histories are updated by every step (`TrainState.fp8`).
    """
    if (model.lora is None) != (base is None):
        raise ValueError("make_train_step: a LoRA model needs `base` params, and only a LoRA model takes them")

    def step(state: TrainState, batch, base):
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
        loss, grads, total, fp8 = _gradients(model, state.params, batch, micro_batches, base, rng, state.fp8)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "tokens": total, "grad_norm": optax.global_norm(grads),
                   "lr": schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, fp8=fp8), metrics

    bs = batch_sharding(mesh)
    rep = sharding.replicated(mesh)
    base_sh = None if base is None else jax.tree.map(lambda x: x.sharding, base)
    jitted = jax.jit(step, in_shardings=(shardings, bs, base_sh), out_shardings=(shardings, rep),
                     donate_argnums=0)
    call = _traced_under(mesh, _bound(jitted, base))
    if not model.run.fp8_delayed:
        return call
    calibrate = _traced_under(mesh, _bound(jax.jit(
        _calibration(model, micro_batches), in_shardings=(shardings.params, bs, base_sh, shardings.fp8),
        out_shardings=shardings.fp8), base))
    fresh_checked = []

    def calibrated_call(state: TrainState, batch):
        # Once per step function: a state whose amax histories are all zero (a fresh run) is
        # calibrated on this batch first, so that step 0 scales as current scaling would.
        if not fresh_checked:
            fresh_checked.append(True)
            if _all_zero(state.fp8):
                state = state.replace(fp8=calibrate(state.params, batch, state.fp8))
        return call(state, batch)
    calibrated_call.lower = call.lower
    return calibrated_call


@jax.jit
def _largest(tree) -> jax.Array:
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree.leaves(tree)]))


def _all_zero(tree) -> bool:
    """Whether every array of `tree` is zero (one replicated scalar read back to the host)."""
    return not float(_largest(tree))


def _calibration(model: Llama, micro_batches: int) -> Callable:
    """`(params, batch, base, fp8) -> fp8`: the histories with one amax pushed per tensor,
    from a forward and backward (no weight gradients, no update) of the batch's first
    micro-batch with current scaling (fp8.calibrating). The loss is scaled as the train step
    scales it (by the whole batch's token count), so the gradients' amaxes are the step's."""
    def calibrate(params, batch, base, f):
        total = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        mb = batch if micro_batches == 1 else jax.tree.map(lambda x: x[0], _micro_batches(batch, micro_batches))
        with fp8_lib.calibrating():
            return jax.grad(lambda f: token_losses(model, params, mb, base, None, f)[0] / total)(f)
    return calibrate


def make_eval_step(model: Llama, mesh: Mesh, param_shardings, base=None) -> Callable:
    """jitted `(params, batch, fp8=None) -> {"loss_sum", "tokens"}` (sum, so batches can be
    pooled); with LoRA, `params` are the adapters and `base` the frozen params. `fp8`: the
    delayed-scaling state to scale with (read, not updated); None: current scaling."""
    def step(params, batch, base, fp8):
        s, n = token_losses(model, params, batch, base, fp8=fp8)
        return {"loss_sum": s, "tokens": n}
    base_sh = None if base is None else jax.tree.map(lambda x: x.sharding, base)
    # The fp8 state (small) keeps the sharding it comes with.
    jitted = jax.jit(step, in_shardings=(param_shardings, batch_sharding(mesh), base_sh, None),
                     out_shardings=sharding.replicated(mesh))
    bound = _bound(jitted, base)

    def call(params, batch, fp8=None):
        return bound(params, batch, fp8)
    call.lower = lambda params, batch, fp8=None: bound.lower(params, batch, fp8)
    return _traced_under(mesh, call)


def _bound(jitted, base) -> Callable:
    """`(x, batch, *rest) -> jitted(x, batch, base, *rest)`: the frozen base travels as an
    argument (a closed-over array would be baked into the executable as a constant)."""
    def call(x, batch, *rest):
        return jitted(x, batch, base, *rest)
    call.lower = lambda x, batch, *rest: jitted.lower(x, batch, base, *rest)
    return call


def _traced_under(mesh: Mesh, fn: Callable) -> Callable:
    # The model's logical constraints resolve only while the mesh and rules are active.
    def call(*args):
        with sharding.activate(mesh):
            return fn(*args)

    def lower(*args):  # for inspecting the compiled step (benchmarks/train_step.py --hlo)
        with sharding.activate(mesh):
            return fn.lower(*args)
    call.lower = lower
    return call
