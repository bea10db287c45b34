"""Run options: how a run executes a model, as opposed to what the model is (config.py).

Two runs of one checkpoint may differ in every field here; none of them is ever written
into model_config.json. Strings (from config files and flags) become dtypes and enums
once, at construction. (No jax import here: `train.py --help` reads config files cheaply.)
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from llama_jax.errors import input_error


class AttentionImpl(enum.Enum):
    AUTO = "auto"      # cudnn on NVIDIA GPUs, splash on TPU, xla elsewhere
    XLA = "xla"        # plain einsums + softmax, any platform
    CUDNN = "cudnn"    # jax.nn.dot_product_attention(implementation="cudnn")
    SPLASH = "splash"  # Pallas splash attention (TPU; interpret mode on CPU)


class RematPolicy(enum.Enum):
    NONE = "none"          # keep every activation
    FULL = "full"          # keep only the layer input, recompute the rest
    DOTS = "dots"          # keep matmul outputs (the paper's recipe), recompute the rest
    DOTS_NO_BATCH = "dots_no_batch"  # keep weight matmuls only (not attention's batched dots)
    MINIMAL = "minimal"    # keep the named projections (q, k, v, attention out, w1, w3)
    DOTS_FLASH = "dots_flash"  # dots_no_batch + the fused attention kernel's outputs (no re-run)
    ATTENTION = "attention"    # keep the attention half (q, k, v, its output and projection),
    #                            recompute the MLP's gate/up: ~1/3 of dots_flash's memory (LoRA 8B)


class MatmulPrecision(enum.Enum):
    BF16 = "bf16"  # the layers' weight matmuls in the compute dtype (`dtype`)
    FP8 = "fp8"    # ... in FP8 (llama_jax.fp8: e4m3 forward, gradients per fp8_grad_format, scaled per fp8_scaling);
    #                a training option: cached decoding stays in `dtype`


class Fp8Scaling(enum.Enum):
    CURRENT = "current"  # each tensor scaled by its own amax: an amax pass before quantising
    DELAYED = "delayed"  # scaled by an amax history (llama_jax.fp8): per call site state in the
    #                      model's "fp8" collection, carried in the train state and checkpoint


class Fp8GradFormat(enum.Enum):
    E5M2 = "e5m2"  # the output gradient in float8_e5m2: range (2 mantissa bits; Transformer Engine's HYBRID)
    E4M3 = "e4m3"  # ... in float8_e4m3fn: precision (3 mantissa bits, 17 binades below the amax)


class LayerLoop(enum.Enum):
    SCAN = "scan"          # nn.scan over the stacked layers: compile time independent of depth
    UNROLLED = "unrolled"  # the same stacked params, one layer after another in the program:
    #                        no per-layer stacking of saved activations (faster on GPUs)


DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
_ENUMS = {"attention_impl": AttentionImpl, "remat_policy": RematPolicy, "layer_loop": LayerLoop,
          "matmul_precision": MatmulPrecision, "fp8_scaling": Fp8Scaling, "fp8_grad_format": Fp8GradFormat}


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How to run a model: dtypes, kernels, memory/speed trade-offs. Defaults: float32, plain."""
    dtype: Any = DTYPES["float32"]        # compute dtype of activations
    param_dtype: Any = DTYPES["float32"]  # dtype parameters are created in
    attention_impl: AttentionImpl = AttentionImpl.AUTO
    remat_policy: RematPolicy = RematPolicy.NONE
    layer_loop: LayerLoop = LayerLoop.SCAN  # how the uncached forward runs the stacked layers
    scan_unroll: int = 1               # layers per nn.scan iteration
    fuse_gate_up: bool = False         # w1|w3 as one matmul, SwiGLU's backward as one kernel (GPUs)
    interpret_kernels: bool = False    # run Pallas kernels in interpret mode on any backend (tests)
    matmul_precision: MatmulPrecision = MatmulPrecision.BF16  # bf16: in run.dtype; fp8: FP8 (Hopper GPUs), a quality cost
    packed_segments: int = 0           # packed rows on cuDNN: 0 the dense mask, M >= 2 the packed kernel
    #                                    with M runs per row (the caller checks rows: train/packed_guard.py)
    fp8_scaling: Fp8Scaling = Fp8Scaling.CURRENT  # FP8 runs: current (each step's amax) or delayed (a history)
    fp8_history: int = 16              # FP8 delayed scaling: amaxes kept per tensor (>= 1)
    fp8_grad_format: Fp8GradFormat = Fp8GradFormat.E5M2  # FP8 runs: the gradients' format, e5m2 or e4m3
    fp8_cast_kernel: bool = True       # FP8 on one GPU: weights, gradients cast to both layouts by a Pallas kernel (False: XLA)

    def __post_init__(self):
        def bad(field, expected):
            raise _Invalid(field, expected, getattr(self, field))

        for f in ("dtype", "param_dtype"):
            dt = _dtype(getattr(self, f))
            if dt is None:
                bad(f, f"one of {tuple(DTYPES)}")
            object.__setattr__(self, f, dt)
        for f, enum_cls in _ENUMS.items():
            v = getattr(self, f)
            if not isinstance(v, enum_cls):
                try:
                    object.__setattr__(self, f, enum_cls(v))
                except ValueError:
                    bad(f, f"one of {[e.value for e in enum_cls]}")
        for f in ("scan_unroll", "fp8_history"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                bad(f, "a positive integer")
        v = self.packed_segments
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0 or v == 1:
            bad("packed_segments", "0 (the dense mask) or an integer >= 2")
        for f in ("fuse_gate_up", "interpret_kernels", "fp8_cast_kernel"):
            if not isinstance(getattr(self, f), (bool, np.bool_)):
                bad(f, "True or False")

    @classmethod
    def like(cls, params) -> "RunOptions":
        """Compute in the dtype the params are held in (float32 params: float32, exact;
        params loaded as bfloat16: bfloat16): what inference uses when given no run options."""
        leaves = [x for x in _leaves(params) if _dtype(getattr(x, "dtype", None)) is not None]
        dt = leaves[0].dtype if leaves else DTYPES["float32"]
        return cls(dtype=dt, param_dtype=dt)

    @property
    def fp8_delayed(self) -> bool:
        """Whether the weight matmuls run in FP8 with delayed scaling (state in the "fp8" collection)."""
        return self.matmul_precision is MatmulPrecision.FP8 and self.fp8_scaling is Fp8Scaling.DELAYED

    def replace(self, **changes: Any) -> "RunOptions":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-able: dtypes by name, enums by value."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, enum.Enum) else v.name if isinstance(v, np.dtype) else v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "RunOptions") -> "RunOptions":
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise input_error(source, f"unknown RunOptions keys {unknown}", sorted(known))
        try:
            return cls(**d)
        except _Invalid as e:  # the key as the user wrote it: config.run.fp8_history
            raise input_error(f"{source}.{e.field}", "invalid value", e.expected, e.got) from None
        except ValueError as e:
            raise input_error(source, str(e)) from None


class _Invalid(ValueError):
    """A RunOptions field's bad value: `RunOptions.<field>=<value>: must be <expected>`."""

    def __init__(self, field: str, expected: str, got: Any):
        super().__init__(f"RunOptions.{field}={got!r}: must be {expected}")
        self.field, self.expected, self.got = field, expected, got


def _leaves(tree):
    """The leaves of nested dicts / tuples / NamedTuples (no jax import: this module stays light)."""
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (tuple, list)):
        for v in tree:
            yield from _leaves(v)
    elif hasattr(tree, "value") and hasattr(tree, "names"):  # a flax Partitioned box
        yield tree.value
    else:
        yield tree


def _dtype(v) -> np.dtype | None:
    """A dtype of DTYPES from its name, a numpy/ml_dtypes dtype or a jnp scalar type; None otherwise."""
    if isinstance(v, str):
        return DTYPES.get(v)
    try:
        dt = np.dtype(v)
    except TypeError:
        return None
    return dt if dt in DTYPES.values() else None


def checkpoint_policy(policy: RematPolicy):
    """The `jax.checkpoint` policy of a remat choice (jax imported here, not at module load:
    train.py --help reads run options without it)."""
    import jax
    cp = jax.checkpoint_policies
    fp8_operands = cp.save_only_these_names("fp8_x", "fp8_w")
    attention_half = cp.save_only_these_names("query_proj", "key_proj", "value_proj", "attention_out",
                                              "attention_proj")

    def fused_attention(prim) -> bool:
        # cuDNN's attention forward is one primitive with its softmax statistics as a second
        # output; saving both lets the backward pass skip re-running the forward kernel.
        return prim.name.startswith("dot_product_attention_fwd")

    def dots_flash(prim, *args, **params) -> bool:
        # FP8 runs: the backward's quantised operands (fp8.py's "fp8_x", "fp8_w", 1 byte per
        # element) are kept too, rather than quantised again (another amax pass over each).
        return (fused_attention(prim) or fp8_operands(prim, *args, **params)
                or cp.dots_with_no_batch_dims_saveable(prim, *args, **params))

    def attention(prim, *args, **params) -> bool:
        # The named values are the sums of base and LoRA terms, saved once (dots policies
        # save each term's matmul output). Nothing of the MLP is kept: a frozen base's
        # backward needs no matmul inputs, and gate/up are recomputed from the layer input
        # and attention_proj.
        return fused_attention(prim) or attention_half(prim, *args, **params)

    return {
        RematPolicy.FULL: cp.nothing_saveable,
        RematPolicy.DOTS: cp.dots_saveable,
        RematPolicy.DOTS_NO_BATCH: cp.dots_with_no_batch_dims_saveable,
        RematPolicy.MINIMAL: cp.save_only_these_names("query_proj", "key_proj", "value_proj", "attention_out",
                                                      "mlp_gate", "mlp_up", "mlp_gate_up"),
        RematPolicy.DOTS_FLASH: dots_flash,
        RematPolicy.ATTENTION: attention,
    }[policy]
