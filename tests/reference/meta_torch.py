"""A small PyTorch LLaMA in Meta's conventions, written for the tests from docs/rotary_and_layouts.md.

Independent of llama_jax: complex-number rotary over interleaved pairs (Meta's
`view_as_complex`), Meta's parameter names, repeat-kv grouped-query attention, float32
softmax. It plays the part of Meta's reference model (which needs fairscale and CUDA).
"""
import math

import torch
import torch.nn.functional as F


def _rms(x, w, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def _freqs_cis(head_dim, positions, theta, scaling):
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if scaling is not None:  # LLaMA 3.1 scaling, element by element in Python floats
        new = []
        lo = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
        hi = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
        for f in freqs.tolist():
            wl = 2 * math.pi / f
            if wl < hi:
                new.append(f)
            elif wl > lo:
                new.append(f / scaling["factor"])
            else:
                s = (scaling["original_max_position_embeddings"] / wl - scaling["low_freq_factor"]) / (
                    scaling["high_freq_factor"] - scaling["low_freq_factor"])
                new.append((1 - s) * f / scaling["factor"] + s * f)
        freqs = torch.tensor(new, dtype=torch.float32)
    angles = positions.float()[..., None] * freqs  # [B,T,H/2]
    return torch.polar(torch.ones_like(angles), angles)


def _rotary(x, cis):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis[:, :, None, :]).flatten(3).type_as(x)


def forward(sd, params, tokens, scaling=None):
    """Logits [B,T,V] of a Meta-named state dict `sd` with Meta's params.json `params`."""
    dim, n, L = params["dim"], params["n_heads"], params["n_layers"]
    kv = params.get("n_kv_heads") or n
    hd, eps = dim // n, params["norm_eps"]
    b, t = tokens.shape
    positions = torch.arange(t)[None].expand(b, t)
    cis = _freqs_cis(hd, positions, params.get("rope_theta", 10000.0), scaling)
    mask = torch.full((t, t), float("-inf")).triu(1)
    h = sd["tok_embeddings.weight"][tokens]
    for i in range(L):
        p = f"layers.{i}."
        x = _rms(h, sd[p + "attention_norm.weight"], eps)
        q = (x @ sd[p + "attention.wq.weight"].T).view(b, t, n, hd)
        k = (x @ sd[p + "attention.wk.weight"].T).view(b, t, kv, hd)
        v = (x @ sd[p + "attention.wv.weight"].T).view(b, t, kv, hd)
        q, k = _rotary(q, cis), _rotary(k, cis)
        k = k.repeat_interleave(n // kv, dim=2)
        v = v.repeat_interleave(n // kv, dim=2)
        scores = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3)) / math.sqrt(hd) + mask
        probs = F.softmax(scores.float(), dim=-1).type_as(q)
        o = (probs @ v.transpose(1, 2)).transpose(1, 2).reshape(b, t, n * hd)
        h = h + o @ sd[p + "attention.wo.weight"].T
        x = _rms(h, sd[p + "ffn_norm.weight"], eps)
        ff = (F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T))
        h = h + ff @ sd[p + "feed_forward.w2.weight"].T
    return (_rms(h, sd["norm.weight"], eps) @ sd["output.weight"].T).float()
