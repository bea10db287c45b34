"""Our model against transformers' LlamaForCausalLM and a Meta-convention torch model.

Random weights, float32, prompts of 600 tokens: a wrong rotary permutation only shows
after a few dozen tokens, so short prompts are not enough.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_utils import hf_logits, hf_model, params_from_hf, rel_err, state_dict_np
from reference import meta_torch
from llama_jax import Llama, ModelConfig, RopeScaling, RunOptions
from llama_jax import model as M
from llama_jax.interop.formats import Format
from llama_jax.interop.meta_params import meta_params_of

TOL = 1e-5  # float32: observed max |diff| / max |logit| is ~1.3e-6
T = 600

CASES = {
    "mha_theta1e4": ModelConfig(dim=128, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=1024),
    "gqa_theta5e5": ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                                rope_theta=500000.0, max_seq_len=1024),
    "mqa": ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=256, multiple_of=32,
                       max_seq_len=1024),
    "llama3_scaling": ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                                  ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=1024,
                                  rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=512)),
}


def _tokens(cfg, b=2, t=T, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    cfg = CASES[request.param]
    model = hf_model(cfg)
    return cfg, model, params_from_hf(model, cfg)


@pytest.mark.parametrize("layer_loop", ["scan", "unrolled"])
def test_logits_match_transformers(case, layer_loop):
    cfg, model, params = case
    tokens = _tokens(cfg)
    ours = np.asarray(jax.jit(Llama(cfg, RunOptions(layer_loop=layer_loop)).apply)({"params": params}, tokens))
    theirs = hf_logits(model, tokens)
    assert ours.dtype == np.float32 and ours.shape == (2, T, cfg.vocab_size)
    err = rel_err(ours, theirs)
    assert err < TOL, f"relative error {err:.2e}"
    # The late positions are where a rotary mistake shows: check them on their own.
    assert rel_err(ours[:, -64:], theirs[:, -64:]) < TOL


def _meta_state_dict(hf_sd, cfg):
    """HF names/rotary -> Meta names/rotary, written here independently of interop/mapping.py."""
    def unpermute(w, n):
        return w.view(n, 2, w.shape[0] // n // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
    out = {"tok_embeddings.weight": hf_sd["model.embed_tokens.weight"], "norm.weight": hf_sd["model.norm.weight"],
           "output.weight": hf_sd["lm_head.weight"]}
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
             "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.n_layers):
        for hf, meta in names.items():
            w = hf_sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                w = unpermute(w, cfg.n_heads)
            elif hf == "self_attn.k_proj":
                w = unpermute(w, cfg.kv_heads)
            out[f"layers.{i}.{meta}.weight"] = w
    return out


def test_meta_layout_matches_meta_reference_and_transformers(case):
    from llama_jax.interop import mapping as weights
    cfg, model, _ = case
    meta_sd = _meta_state_dict(model.state_dict(), cfg)
    tokens = _tokens(cfg, seed=2)
    scaling = None if cfg.rope_scaling is None else vars(cfg.rope_scaling)
    with torch.no_grad():
        meta_params = meta_params_of(cfg.replace(rope_scaling=None))  # scaling passed on its own
        ref = meta_torch.forward(meta_sd, meta_params, torch.as_tensor(tokens).long(), scaling).numpy()
    # The Meta-convention reference agrees with transformers: the test's permutation is right.
    assert rel_err(ref, hf_logits(model, tokens)) < TOL
    params = weights.from_state_dict({k: v.numpy() for k, v in meta_sd.items()}, cfg, Format.META)
    ours = np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, tokens))
    err = rel_err(ours, ref)
    assert err < TOL, f"relative error {err:.2e}"


def _hf_causal_mask(t):
    return torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]


def _layer0(params):
    return jax.tree.map(lambda x: x[0], params["layers"])


def test_modules_match_transformers(case):
    """RMSNorm, rotary, attention and a whole block, one at a time."""
    cfg, model, params = case
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, T, cfg.dim)).astype(np.float32)
    xt = torch.as_tensor(x)
    layer = model.model.layers[0]
    lp = _layer0(params)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T))
    with torch.no_grad():
        cos_t, sin_t = model.model.rotary_emb(xt, torch.as_tensor(positions).long())
        # RMSNorm
        ours = M.RMSNorm(cfg.dim, cfg.norm_eps).apply({"params": lp["attention_norm"]}, x)
        assert rel_err(ours, layer.input_layernorm(xt).numpy()) < 1e-6
        # Rotary on a query: HF rotates halves of its permuted rows, we rotate pairs.
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        from llama_jax.interop import mapping as weights
        q_meta = rng.standard_normal((2, T, cfg.n_heads, cfg.head_dim)).astype(np.float32)
        q_hf = weights.meta_to_hf_rotary(q_meta.reshape(-1, cfg.head_dim).T.reshape(cfg.head_dim, -1), 1)
        q_hf = torch.as_tensor(q_hf.T.reshape(q_meta.shape)).transpose(1, 2)
        rot_hf, _ = apply_rotary_pos_emb(q_hf, q_hf, cos_t, sin_t)
        rot_hf = rot_hf.transpose(1, 2).numpy()
        sin, cos = M.rope_tables(jnp.asarray(positions), cfg)
        rot = np.asarray(M.apply_rope(jnp.asarray(q_meta), sin, cos))
        rot_back = weights.hf_to_meta_rotary(rot_hf.reshape(-1, cfg.head_dim).T, 1).T.reshape(rot.shape)
        assert rel_err(rot, rot_back) < 1e-6
        # Attention (causal), then the whole pre-norm block.
        mask = _hf_causal_mask(T)
        attn_hf = layer.self_attn(xt, position_embeddings=(cos_t, sin_t), attention_mask=mask)[0].numpy()
        inputs = M.LayerInputs(sin, cos)
        attn = M.Attention(cfg, RunOptions()).apply({"params": lp["attention"]}, x, inputs)
        assert rel_err(attn, attn_hf) < TOL
        block_hf = layer(xt, position_embeddings=(cos_t, sin_t), attention_mask=mask)
        block_hf = (block_hf[0] if isinstance(block_hf, tuple) else block_hf).numpy()
        block, _ = M.Block(cfg, RunOptions()).apply({"params": lp}, x, inputs)
        assert rel_err(block, block_hf) < TOL


def test_rope_frequencies_match_transformers(case):
    cfg, model, _ = case
    theirs = model.model.rotary_emb.inv_freq.numpy()
    ours = M.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    # Bit for bit: angles reach 1000 rad, where one ulp of frequency moves them by ~1e-4 rad.
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("layer_loop,remat,fuse", [("scan", "none", False), ("unrolled", "dots_flash", True)])
def test_gradients_match_transformers(case, layer_loop, remat, fuse):
    """Backward pass too (our output projection has a custom VJP): grads of one loss."""
    from llama_jax.interop import mapping as weights
    cfg, model, params = case
    run = RunOptions(layer_loop=layer_loop, remat_policy=remat, fuse_gate_up=fuse)
    tokens = _tokens(cfg, b=1, t=520, seed=4)
    probe = np.random.default_rng(5).standard_normal((1, 520, cfg.vocab_size)).astype(np.float32)
    model.zero_grad()
    logits = model(torch.as_tensor(tokens).long()).logits
    (logits * torch.as_tensor(probe)).sum().backward()
    theirs = weights.from_state_dict({k: p.grad.numpy() for k, p in model.named_parameters()}, cfg, Format.HF)
    ours = jax.grad(lambda p: jnp.sum(Llama(cfg, run).apply({"params": p}, tokens) * probe))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(ours):
        ref = theirs
        for k in path:
            ref = ref[k.key]
        err = rel_err(g, ref)  # observed ~1-2e-6
        assert err < 1e-5, (jax.tree_util.keystr(path), err)
