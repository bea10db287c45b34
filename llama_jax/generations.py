"""The LLaMA generations (1, 2, 3, 3.1, 3.2, 3.3) and the facts that differ between them.

A checkpoint's generation is an explicit, recorded property (`ModelConfig.generation`,
stored in model_config.json, read from the source files by the converters, settable with
`--generation`). Everything that depends on it is keyed on it here, never guessed from
the vocabulary size: the special token ids and default stop ids, the axis Meta's
model-parallel shards split the embedding along, the keys of Meta's params.json, the
trained context length and the llama3 rope scaling factor Meta's params.json leaves out.
See docs/generations.md for the sources of these facts.
"""
from __future__ import annotations

import dataclasses
import enum


class Generation(enum.Enum):
    LLAMA1 = "1"      # Feb 2023: SentencePiece 32000, 2048 context
    LLAMA2 = "2"      # Jul 2023: + grouped-query attention (70B), 4096 context
    LLAMA3 = "3"      # Apr 2024: tiktoken 128256, rope_theta 500000, 8192 context
    LLAMA3_1 = "3.1"  # Jul 2024: llama3 rope scaling (factor 8), 131072 context, <|eom_id|>
    LLAMA3_2 = "3.2"  # Sep 2024: 1B/3B with tied embeddings, rope factor 32
    LLAMA3_3 = "3.3"  # Dec 2024: 70B, the 3.1 architecture

    @property
    def llama3_family(self) -> bool:
        """Tiktoken tokenizer, rope_theta in params.json, embedding sharded by vocabulary."""
        return self not in (Generation.LLAMA1, Generation.LLAMA2)

    @property
    def scaled_rope(self) -> bool:
        """Trained with the llama3 rope frequency scaling (params.json `use_scaled_rope`)."""
        return self in (Generation.LLAMA3_1, Generation.LLAMA3_2, Generation.LLAMA3_3)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    stop: tuple[int, ...]  # what Meta's own generation code stops on


# SentencePiece: unk 0, bos 1, eos 2. Llama 3 tiktoken: <|begin_of_text|> 128000,
# <|end_of_text|> 128001, <|eom_id|> 128008 (3.1 on), <|eot_id|> 128009. Meta's llama3
# tokenizer stops on end_of_text and eot; llama-models' 3.1+ tokenizer adds eom.
_SENTENCEPIECE = SpecialIds(bos=1, eos=2, stop=(2,))
_LLAMA3 = SpecialIds(bos=128000, eos=128001, stop=(128001, 128009))
_LLAMA3_1 = SpecialIds(bos=128000, eos=128001, stop=(128001, 128008, 128009))


def special_ids(generation: Generation) -> SpecialIds:
    """bos, eos and the default stop ids of `generation`'s released tokenizer."""
    if not generation.llama3_family:
        return _SENTENCEPIECE
    return _LLAMA3_1 if generation.scaled_rope else _LLAMA3


def embedding_split_axis(generation: Generation) -> int:
    """Axis of tok_embeddings.weight [V, D] that Meta's shards split: dim (1/2), vocab (3+)."""
    return 0 if generation.llama3_family else 1


# The context length each generation was trained for (Meta's params.json does not say).
CONTEXT = {Generation.LLAMA1: 2048, Generation.LLAMA2: 4096, Generation.LLAMA3: 8192,
           Generation.LLAMA3_1: 131072, Generation.LLAMA3_2: 131072, Generation.LLAMA3_3: 131072}

# The llama3 rope scaling factor of each scaled generation. Meta's Llama 3 params.json only
# says `use_scaled_rope`; Meta's reference code hard-codes 8, which is wrong for 3.2 1B/3B
# (meta-llama/llama-models#241): their published config.json says 32.
ROPE_FACTOR = {Generation.LLAMA3_1: 8.0, Generation.LLAMA3_2: 32.0, Generation.LLAMA3_3: 8.0}

# params.json keys Meta shipped, per generation (optional ones only where used:
# n_kv_heads and ffn_dim_multiplier appear in Llama 2 70B, not 7B/13B).
_L1_KEYS = ("dim", "multiple_of", "n_heads", "n_layers", "norm_eps", "vocab_size")
_L3_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
            "ffn_dim_multiplier", "norm_eps", "rope_theta")
META_KEYS: dict[Generation, tuple[str, ...]] = {
    Generation.LLAMA1: _L1_KEYS,
    Generation.LLAMA2: _L1_KEYS,
    Generation.LLAMA3: _L3_KEYS,
    Generation.LLAMA3_1: _L3_KEYS + ("use_scaled_rope",),
    Generation.LLAMA3_2: _L3_KEYS + ("use_scaled_rope",),
    Generation.LLAMA3_3: _L3_KEYS + ("use_scaled_rope",),
}
META_OPTIONAL_KEYS = ("n_kv_heads", "ffn_dim_multiplier")  # Llama 2: written only where used
# Keys a Meta params.json may carry that are not architecture (Meta's ModelArgs run options),
# and the Llama 4 names of the rope factors, accepted when present.
META_IGNORED_KEYS = ("max_batch_size", "max_seq_len")
META_ROPE_KEYS = ("use_scaled_rope", "rope_scaling_factor", "rope_high_freq_factor")


def fits_meta_keys(keys, generation: Generation) -> bool:
    """Whether a params.json with `keys` has `generation`'s key set (optional keys aside)."""
    keys = set(keys) - set(META_IGNORED_KEYS)
    allowed = set(META_KEYS[generation]) | (set(META_OPTIONAL_KEYS) if generation is Generation.LLAMA2 else set())
    required = set(META_KEYS[generation]) - set(META_OPTIONAL_KEYS)
    return required <= keys <= allowed


def parse(value) -> Generation:
    """A Generation from itself, "3.1", 3.1 or 3."""
    if isinstance(value, Generation):
        return value
    text = str(value)
    try:
        return Generation(text[:-2] if text.endswith(".0") else text)
    except ValueError:
        raise ValueError(f"unknown LLaMA generation {value!r}; known: {[g.value for g in Generation]}") from None


def from_meta_params(params: dict, tied: bool) -> Generation:
    """The generation a Meta params.json (and whether the weights are tied) says.

    rope_theta appears from Llama 3 on, use_scaled_rope from 3.1; 3.2 is the tied one
    (3.3 has the 3.1 files: pass it explicitly). Without rope_theta: n_kv_heads or
    ffn_dim_multiplier, or norm_eps 1e-5, only shipped with Llama 2 (LLaMA 1 65B aside:
    pass generation 1 explicitly).
    """
    if "rope_theta" in params:
        if tied or params.get("rope_scaling_factor") == ROPE_FACTOR[Generation.LLAMA3_2]:
            return Generation.LLAMA3_2
        return Generation.LLAMA3_1 if params.get("use_scaled_rope") else Generation.LLAMA3
    if "n_kv_heads" in params or "ffn_dim_multiplier" in params or params.get("norm_eps") != 1e-6:
        return Generation.LLAMA2
    return Generation.LLAMA1


def from_hf_config(c: dict, rope_factor: float | None, tied: bool) -> Generation:
    """The generation an HF config.json says: llama3 rope factor 32 or tied -> 3.2,
    factor 8 -> 3.1 (3.3 has the same files: pass it explicitly), the Llama 3 bos or
    rope_theta -> 3, a 2048 context -> LLaMA 1, else 2."""
    if rope_factor is not None:
        return Generation.LLAMA3_2 if tied or rope_factor == ROPE_FACTOR[Generation.LLAMA3_2] else Generation.LLAMA3_1
    bos = c.get("bos_token_id")
    theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))
    if bos == _LLAMA3.bos or float(theta) == 500000.0:
        return Generation.LLAMA3_2 if tied else Generation.LLAMA3
    return Generation.LLAMA1 if c.get("max_position_embeddings") == CONTEXT[Generation.LLAMA1] else Generation.LLAMA2


def from_architecture(rope_theta: float, rope_factor: float | None, tied: bool) -> Generation:
    """For configs that do not say (model_config.json written before the field existed):
    scaled rope -> 3.1 (factor 32 or tied: 3.2), rope_theta 500000 -> 3, else 2."""
    if rope_factor is not None:
        return Generation.LLAMA3_2 if tied or rope_factor == ROPE_FACTOR[Generation.LLAMA3_2] else Generation.LLAMA3_1
    if rope_theta == 500000.0:
        return Generation.LLAMA3_2 if tied else Generation.LLAMA3
    return Generation.LLAMA2
