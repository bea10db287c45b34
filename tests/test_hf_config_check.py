"""Only LLaMA config.json files convert; look-alike architectures are refused by field (issue 18.7).

The configs come from transformers' own config classes (small sizes), as the Hub writes them.
"""
import pytest
import transformers

from llama_jax import ModelConfig
from llama_jax.errors import InputError
from llama_jax.interop.hf_config import hf_config_of
from llama_jax.interop.hf_config import config_from_hf

SMALL = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)


def _hf(cls, **kw):
    d = cls(**{**SMALL, **kw}).to_dict()
    d.setdefault("architectures", [cls.__name__.replace("Config", "ForCausalLM")])
    return d


def test_llama_configs_accepted():
    config_from_hf(_hf(transformers.LlamaConfig))
    config_from_hf(hf_config_of(ModelConfig.preset("tiny")))
    l3 = _hf(transformers.LlamaConfig, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert config_from_hf(l3).rope_scaling.factor == 32.0


@pytest.mark.parametrize("make, field", [
    (lambda: _hf(transformers.MistralConfig, sliding_window=4096), "model_type"),
    (lambda: {**_hf(transformers.MistralConfig, sliding_window=4096), "model_type": "llama"}, "sliding_window"),
    (lambda: _hf(transformers.Qwen2Config), "model_type"),
    (lambda: {**_hf(transformers.Qwen2Config), "model_type": "llama", "use_sliding_window": True},
     "use_sliding_window"),
    (lambda: _hf(transformers.LlamaConfig, hidden_act="gelu"), "hidden_act"),
    (lambda: _hf(transformers.LlamaConfig, attention_bias=True), "attention_bias"),
    (lambda: _hf(transformers.LlamaConfig, mlp_bias=True), "mlp_bias"),
    (lambda: _hf(transformers.LlamaConfig, head_dim=32), "head_dim"),
    (lambda: {**_hf(transformers.LlamaConfig), "architectures": ["MistralForCausalLM"]}, "architectures"),
    (lambda: {**_hf(transformers.LlamaConfig), "num_local_experts": 8}, "num_local_experts"),
    (lambda: {**_hf(transformers.LlamaConfig), "hidden_size": "64"}, "hidden_size"),
    (lambda: {**_hf(transformers.LlamaConfig), "rms_norm_eps": -1.0}, "rms_norm_eps"),
])
def test_other_architectures_refused(make, field):
    with pytest.raises(InputError, match=rf"^cfg/config\.json: {field}: ") as e:
        config_from_hf(make(), source="cfg/config.json")
    assert "\n" not in str(e.value) and "got" in str(e.value)
