"""Scorer log-likelihoods against transformers' LlamaForCausalLM, and rolling perplexity's
bookkeeping (every token scored exactly once)."""
import math

import numpy as np
import pytest
import torch

from hf_utils import hf_model, params_from_hf
from llama_jax import ModelConfig
from llama_jax.evaluation import Scorer, perplexity, rolling_windows
from llama_jax.evaluation.scoring import pack_rows, prepare

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=128)


@pytest.fixture(scope="module")
def models():
    model = hf_model(CFG, seed=3)
    return model, params_from_hf(model, CFG)


def hf_loglikelihood(model, context, continuation, max_length):
    """Reference: transformers on the same left-truncated input, log-softmax summed in float64."""
    full = (list(context) + list(continuation))[-(max_length + 1):]
    inp = torch.tensor([full[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(inp).logits[0].double(), -1).numpy()
    n = len(continuation)
    pos = np.arange(len(full) - 1 - n, len(full) - 1)
    targets = np.asarray(full[-n:])
    return float(logp[pos, targets].sum()), bool((logp[pos].argmax(-1) == targets).all())


def _requests(rng, n, max_total):
    out = []
    for _ in range(n):
        total = int(rng.integers(3, max_total))
        n_cont = int(rng.integers(1, min(total - 1, 100) + 1))
        toks = rng.integers(3, CFG.vocab_size, total).tolist()
        out.append(([1] + toks[:total - n_cont], toks[total - n_cont:]))
    return out


def test_loglikelihood_matches_transformers(models):
    model, params = models
    rng = np.random.default_rng(0)
    # Short requests packed several per row, long ones past the 128-token context, mixed.
    reqs = _requests(rng, 24, 100) + _requests(rng, 6, 300)
    reqs.append(([1, 5, 6], [7]))
    scorer = Scorer(CFG, params, tokens_per_batch=256, pack_length=32)
    ours = scorer.loglikelihood(reqs)
    assert any(len(c) + len(x) > CFG.max_seq_len + 1 for c, x in reqs)
    for (c, x), (ll, greedy) in zip(reqs, ours):
        ref_ll, ref_greedy = hf_loglikelihood(model, c, x, CFG.max_seq_len)
        assert abs(ll - ref_ll) < 1e-4 + 1e-5 * abs(ref_ll), (len(c), len(x), ll, ref_ll)
        assert greedy == ref_greedy


def test_is_greedy_true_for_the_models_own_argmax(models):
    model, params = models
    context = [1, 10, 20, 30]
    cont = []
    for _ in range(5):  # greedy-decode with transformers, then ask our scorer about it
        with torch.no_grad():
            cont.append(int(model(torch.tensor([context + cont])).logits[0, -1].argmax()))
    (ll, greedy), (_, other) = Scorer(CFG, params).loglikelihood([(context, cont), (context, cont[:-1] + [cont[-1] + 1])])
    assert greedy and not other


def test_batching_does_not_change_results(models):
    _, params = models
    reqs = _requests(np.random.default_rng(1), 20, 120)
    a = Scorer(CFG, params, tokens_per_batch=128, pack_length=16).loglikelihood(reqs)
    b = Scorer(CFG, params, tokens_per_batch=1024, pack_length=128).loglikelihood(reqs)
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], rtol=1e-5, atol=1e-4)


def test_prepare_and_packing_rules():
    p = prepare(0, list(range(1, 11)), [11, 12], max_length=5)
    assert p.inputs.tolist() == [7, 8, 9, 10, 11] and p.targets.tolist() == [8, 9, 10, 11, 12] and p.n_cont == 2
    with pytest.raises(ValueError, match="exceeds the model's context"):
        prepare(3, [1], list(range(9)), max_length=5)
    with pytest.raises(ValueError, match="empty continuation"):
        prepare(0, [1], [], max_length=5)
    rows = pack_rows([5, 3, 3, 2, 8, 1], capacity=8)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum([5, 3, 3, 2, 8, 1][i] for i in r) <= 8 for r in rows) and len(rows) == 3


@pytest.mark.parametrize("n,stride", [(1, None), (5, None), (128, None), (129, None), (300, None), (300, 50), (7, 3)])
def test_rolling_windows_cover_every_token_once(n, stride):
    toks = list(range(10, 10 + n))
    windows = rolling_windows(toks, bos=1, max_length=128, stride=stride)
    assert [t for _, cont in windows for t in cont] == toks
    full = [1] + toks
    for ctx, cont in windows:
        assert len(ctx) >= 1 and len(ctx) + len(cont) <= 129
        start = full.index(ctx[0]) if ctx[0] != 1 else 0
        assert full[start:start + len(ctx) + len(cont)] == ctx + cont  # contiguous in the document
    if stride is not None and n > 128:
        assert all(len(c) + len(x) == 129 for c, x in windows)  # full context after the first window


class _CharTokenizer:
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=True, eos=False):
        return ([1] if bos else []) + [3 + (ord(ch) % 250) for ch in text]


def test_perplexity_equals_a_direct_full_sequence_computation(models):
    model, params = models
    text = "the quick brown fox jumps over the lazy dog, twice: the quick brown fox."
    tok = _CharTokenizer()
    ids = tok.encode(text)  # fits in one window: bos + 73 tokens
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1).numpy()
    direct = float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
    m = perplexity(Scorer(CFG, params), tok, [text, ""])
    assert m["tokens"] == len(text) and m["documents"] == 1 and m["bytes"] == len(text)
    assert abs(m["loglikelihood"] - direct) < 1e-4
    assert math.isclose(m["token_perplexity"], math.exp(-direct / len(text)), rel_tol=1e-5)
    assert math.isclose(m["bits_per_byte"], -direct / len(text) / math.log(2), rel_tol=1e-5)
    assert m["words"] == 14 and math.isclose(m["word_perplexity"], math.exp(-direct / 14), rel_tol=1e-5)


def test_perplexity_counts_tokens_across_windows(models):
    _, params = models
    tok = _CharTokenizer()
    docs = ["x" * 300, "short one", "y" * 129]
    scorer = Scorer(CFG, params)
    m = perplexity(scorer, tok, docs, chunk_documents=2)
    assert m["tokens"] == 300 + 9 + 129 and m["documents"] == 3
    strided = perplexity(scorer, tok, docs, stride=64)
    assert strided["tokens"] == m["tokens"]
    # Equal to scoring each document's windows directly.
    total = sum(ll for d in docs for ll, _ in scorer.loglikelihood(rolling_windows(tok.encode(d, bos=False), 1, 128)))
    assert abs(m["loglikelihood"] - total) < 1e-3


def test_mesh_gives_the_same_scores(models):
    from llama_jax.sharding import make_mesh
    _, params = models
    reqs = _requests(np.random.default_rng(2), 10, 100)
    plain = Scorer(CFG, params).loglikelihood(reqs)
    meshed = Scorer(CFG, params, mesh=make_mesh((2, -1, 1)), tokens_per_batch=512).loglikelihood(reqs)
    np.testing.assert_allclose([x for x, _ in meshed], [x for x, _ in plain], rtol=1e-5, atol=1e-4)
