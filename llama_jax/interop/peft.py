"""LoRA adapters in Hugging Face peft's format <-> ours (llama_jax.lora).

peft saves a folder with `adapter_config.json` and `adapter_model.safetensors` holding, per
adapted Linear of a LlamaForCausalLM, `base_model.model.<module>.lora_A.weight` [R, in] and
`...lora_B.weight` [out, R], torch's [out, in] layout, where module is transformers' name
(`model.layers.{i}.self_attn.q_proj`). Our `a` / `b` are the same matrices in our layout
(lora.py), so the names, transposes and heads come from mapping.RULES, and HF's rotary
row permutation (mapping.meta_to_hf_rotary) is applied to the output rows of q/k lora_B,
as it is to the q/k base weights: B_hf @ A_hf is then exactly the HF permutation of our
delta. docs/peft.md has the layout.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from llama_jax import checkpoint
from llama_jax.config import ModelConfig
from llama_jax.errors import input_error, read_json
from llama_jax.interop import mapping
from llama_jax.interop.safetensors_files import SafetensorsFile, SafetensorsWriter
from llama_jax.lora import TARGETS, LoraConfig, factor_shape, merge

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
_RULES = {r.path: r for r in mapping.RULES}
_HEADS = {"N": lambda c: c.n_heads, "K": lambda c: c.kv_heads}  # rotary rows are grouped per head


def hf_module(target: str) -> str:
    """transformers' module of our target, "{i}" for the layer: model.layers.{i}.self_attn.q_proj."""
    return _RULES[TARGETS[target].path].hf.removesuffix(".weight")


def hf_target_name(target: str) -> str:
    """The short name peft's target_modules use: q_proj, ..., down_proj."""
    return hf_module(target).rsplit(".", 1)[1]


_BY_HF_NAME = {hf_target_name(t): t for t in TARGETS}


def to_peft(target: str, a: np.ndarray, b: np.ndarray, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """One layer's (a, b) in our layout -> peft's (lora_A [R, in], lora_B [out, R])."""
    t, rank = TARGETS[target], a.shape[-1]
    lora_a = a.reshape(-1, rank).T          # [<inputs>, R] -> [R, in]
    lora_b = b.reshape(rank, -1).T          # [R, <outputs>] -> [out, R]
    if _RULES[t.path].rotary:
        lora_b = mapping.meta_to_hf_rotary(lora_b, _HEADS[t.outputs[0]](config))
    return np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)


def from_peft(target: str, lora_a: np.ndarray, lora_b: np.ndarray, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """One layer's peft (lora_A [R, in], lora_B [out, R]) -> our (a, b)."""
    t, rank = TARGETS[target], lora_a.shape[0]
    if _RULES[t.path].rotary:
        lora_b = mapping.hf_to_meta_rotary(lora_b, _HEADS[t.outputs[0]](config))
    a = lora_a.T.reshape(factor_shape(t.a, config, rank))
    b = lora_b.T.reshape(factor_shape(t.b, config, rank))
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def tensor_name(target: str, layer: int, factor: str) -> str:
    """The safetensors key of one factor ("a" or "b") of one layer, as peft saves it."""
    return f"{PREFIX}{hf_module(target).format(i=layer)}.lora_{factor.upper()}.weight"


def adapter_config(lora: LoraConfig, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json peft writes for these settings (unwritten fields: peft's defaults)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted(hf_target_name(t) for t in lora.targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_bias": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def save_peft(adapters: dict, lora: LoraConfig, config: ModelConfig, out_dir: str | os.PathLike,
              base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """Write adapters (lora.init_adapters' layout) as a peft folder; returns its path.

    `peft.PeftModel.from_pretrained(hf_base, out_dir)` on our HF export of the base then
    computes what `lora.merge` does."""
    lora.check(config)
    tensors = {}
    for target in lora.targets:
        node = adapters
        for p in TARGETS[target].path:
            node = node[p]
        a, b = np.asarray(node["a"]), np.asarray(node["b"])
        for f, x in (("a", a), ("b", b)):
            want = factor_shape("L" + getattr(TARGETS[target], f), config, lora.rank)
            if x.shape != want:
                raise input_error(f"adapters/{'/'.join(TARGETS[target].path)}/{f}",
                                  f"shape does not match r={lora.rank} on this model", want, x.shape)
        for i in range(config.n_layers):
            pa, pb = to_peft(target, a[i], b[i], config)
            tensors[tensor_name(target, i, "a")], tensors[tensor_name(target, i, "b")] = pa, pb
    with checkpoint.output_dir(out_dir, overwrite) as tmp:
        writer = SafetensorsWriter(tmp / WEIGHTS_FILE, {n: (w.shape, w.dtype) for n, w in sorted(tensors.items())})
        for name, w in tensors.items():
            writer.write(name, w)
        writer.close()
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config(lora, base_model_name_or_path), indent=2))
    return checkpoint.absolute(out_dir)


# adapter_config.json fields whose non-default values change the model in ways our
# LoRA does not represent: (allowed values, what to say is expected).
_MUST_BE = {
    "bias": (("none",), "none"), "fan_in_fan_out": ((False, None), "false"),
    "use_rslora": ((False, None), "false"), "use_dora": ((False, None), "false"),
    "lora_bias": ((False, None), "false"), "modules_to_save": ((None, []), "null"),
    "layers_to_transform": ((None,), "null (every layer)"), "layer_replication": ((None,), "null"),
    "rank_pattern": ((None, {}), "{} (one rank)"), "alpha_pattern": ((None, {}), "{} (one alpha)"),
    "target_parameters": ((None, []), "null"), "trainable_token_indices": ((None,), "null"),
    "alora_invocation_tokens": ((None,), "null"), "use_qalora": ((False, None), "false"),
    "use_bdlora": ((None, False), "null"),
    # these initialisations rewrite the base weights, which a plain adapter file does not carry
    "init_lora_weights": ((True, False, "gaussian", "orthogonal", "eva"), "true, false or a base-preserving init"),
}


def _lora_config(cfg: dict, where: str) -> LoraConfig:
    if not isinstance(cfg, dict):
        raise input_error(where, "not a JSON object", "{peft_type, r, lora_alpha, ...}", type(cfg).__name__)
    if cfg.get("peft_type") != "LORA":
        raise input_error(where, "peft_type is not LoRA", "LORA", cfg.get("peft_type"))
    for key, (allowed, expected) in _MUST_BE.items():
        if key in cfg and not any(cfg[key] == v and type(cfg[key]) is type(v) for v in allowed):
            raise input_error(where, f"{key} is not supported", expected, cfg[key])
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise input_error(where, f"{key} is missing", "a positive number", None)
    return LoraConfig(rank=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                      targets=tuple(TARGETS))  # the real targets come from the tensors


_KEY = re.compile(r"(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


def _parse_key(name: str, config: ModelConfig, where: str) -> tuple[str, int, str]:
    """(our target, layer, "a" or "b") of a peft tensor name; anything else is an error naming it."""
    m = _KEY.fullmatch(name)
    target = _BY_HF_NAME.get(m.group(3)) if m else None
    if target is None or hf_module(target).split(".")[-2] != m.group(2):
        raise input_error(f"{where}: tensor {name}", "not a LoRA factor of a module we can adapt",
                          f"lora_A/lora_B of {', '.join(sorted(_BY_HF_NAME))} in model.layers.N", name)
    layer = int(m.group(1))
    if layer >= config.n_layers:
        raise input_error(f"{where}: tensor {name}", "layer index beyond the model", f"< {config.n_layers}", layer)
    return target, layer, m.group(4).lower()


def _check_shape(name: str, shape, target: str, factor: str, lora: LoraConfig, config: ModelConfig, where: str):
    t = TARGETS[target]
    n_in, n_out = factor_shape(t.inputs, config, 1), factor_shape(t.outputs, config, 1)
    expected = (lora.rank, int(np.prod(n_in))) if factor == "a" else (int(np.prod(n_out)), lora.rank)
    if tuple(shape) != expected:
        raise input_error(f"{where}: tensor {name}", f"shape does not match r={lora.rank} on this model",
                          expected, tuple(shape))


def load_peft(adapter_dir: str | os.PathLike, config: ModelConfig) -> tuple[dict, LoraConfig]:
    """A peft LoRA folder (ours or trained elsewhere) -> (adapters in our layout, LoraConfig)."""
    d = Path(adapter_dir)
    weights_path = d / WEIGHTS_FILE
    if not weights_path.is_file():
        also = " (only adapter_model.bin, the pickle format, is there: re-save with safetensors)" \
            if (d / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"{weights_path}: no such file{also}")
    lora = _lora_config(read_json(d / CONFIG_FILE), str(d / CONFIG_FILE))
    f = SafetensorsFile(weights_path)
    found: dict[str, dict[str, dict[int, str]]] = {}
    for name in f.keys():
        target, layer, factor = _parse_key(name, config, str(weights_path))
        _check_shape(name, f.shape(name), target, factor, lora, config, str(weights_path))
        found.setdefault(target, {"a": {}, "b": {}})[factor][layer] = name
    if not found:
        raise input_error(weights_path, "holds no LoRA tensors", "lora_A/lora_B weights", 0)
    targets = tuple(t for t in TARGETS if t in found)
    lora = LoraConfig(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=targets)
    lora.check(config)
    adapters: dict = {}
    for target in targets:
        for factor in ("a", "b"):
            missing = sorted(set(range(config.n_layers)) - set(found[target][factor]))
            if missing:
                raise input_error(weights_path, f"{hf_target_name(target)}.lora_{factor.upper()} is missing "
                                  f"for layers {missing[:8]}", f"all {config.n_layers} layers", len(missing))
        pairs = [from_peft(target, f.read(found[target]["a"][i]), f.read(found[target]["b"][i]), config)
                 for i in range(config.n_layers)]
        node = adapters
        for p in TARGETS[target].path:
            node = node.setdefault(p, {})
        node["a"], node["b"] = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    return adapters, lora


def merge_into_checkpoint(base: str | os.PathLike, adapter_dir: str | os.PathLike, output: str | os.PathLike,
                          overwrite: bool = False) -> Path:
    """A params-only checkpoint of `base` with the peft adapters in `adapter_dir` merged in
    (export it to HF or Meta files with convert.from_orbax); returns its path."""
    config, params = checkpoint.load_checkpoint(base)
    adapters, lora = load_peft(adapter_dir, config)
    merged = merge(params, adapters, lora)
    return checkpoint.save_params(output, merged, config, overwrite=overwrite,
                                  tokenizer_dir=checkpoint.resolve_checkpoint(base))
