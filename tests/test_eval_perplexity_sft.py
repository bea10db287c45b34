"""Perplexity on fine-tuning examples (chat_jsonl, prompt_completion): only the loss-masked
tokens (the answers) are scored, each conditioned on everything before it in its window;
checked against a direct forward pass of the model over the whole example, and over each
rolling window when the example is longer than the context."""
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from llama_jax import Llama, ModelConfig
from llama_jax.data.config import LossMask, SourceKind
from llama_jax.data.sft import SftExample, encode_example
from llama_jax.evaluation import Scorer, perplexity, rolling_windows
from llama_jax.evaluation.perplexity import masked_requests
import tiny_tokenizers

CFG = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=640, multiple_of=16, max_seq_len=128)
DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"},
          {"role": "assistant", "content": "hello user"}, {"role": "user", "content": "the world?"},
          {"role": "assistant", "content": "hello world, said the assistant"}]
EXAMPLES = {"chat": SftExample(SourceKind.CHAT_JSONL, DIALOG, LossMask.ASSISTANT, "d.jsonl", 0),
            "last": SftExample(SourceKind.CHAT_JSONL, DIALOG, LossMask.LAST_ASSISTANT, "d.jsonl", 0),
            "pair": SftExample(SourceKind.PROMPT_COMPLETION, ("hello world, the user", " said hello"),
                               LossMask.ASSISTANT, "p.jsonl", 0)}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tok = tiny_tokenizers.tiktoken(tmp_path_factory.mktemp("tik"))
    params = nn.unbox(Llama(CFG).init(jax.random.PRNGKey(0), np.ones((1, 8), np.int32))["params"])
    return tok, params


def _log_probs(params, ids):
    """log p(ids[t + 1] | ids[:t + 1]) for every t, from one forward pass."""
    logits = Llama(CFG).apply({"params": params}, np.asarray([ids[:-1]], np.int32))[0]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), -1), np.float64)
    return logp[np.arange(len(ids) - 1), ids[1:]]


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_answers_only_equal_a_direct_forward_pass(model, kind):
    tok, params = model
    ids, mask = encode_example(tok, EXAMPLES[kind])
    assert ids[0] == tok.bos_id and 0 < mask.sum() < len(ids) and len(ids) <= CFG.max_seq_len
    direct = float(_log_probs(params, ids.tolist())[mask[1:] == 1].sum())
    m = perplexity(Scorer(CFG, params), tok, [EXAMPLES[kind]])
    assert m["tokens"] == int(mask.sum()) and m["documents"] == 1 and m["scored"] == "answers"
    assert abs(m["loglikelihood"] - direct) < 1e-4
    assert math.isclose(m["token_perplexity"], math.exp(-direct / mask.sum()), rel_tol=1e-5)
    assert m["bits_per_byte"] is None and "answer" in m["text_metrics"]


@pytest.mark.parametrize("stride", [None, 5])
def test_answers_across_windows_equal_each_window_scored_directly(model, stride):
    """A context of 12 tokens: the dialog spans several windows, answers cut across them."""
    tok, params = model
    ids, mask = (x.tolist() for x in encode_example(tok, EXAMPLES["chat"]))
    body, body_mask = ids[1:], mask[1:]
    assert len(body) > 3 * 12
    direct, p = 0.0, 0
    for context, cont in rolling_windows(body, tok.bos_id, 12, stride):
        lp = _log_probs(params, context + cont)[-len(cont):]
        direct += float(sum(x for x, w in zip(lp, body_mask[p:p + len(cont)]) if w))
        p += len(cont)
    m = perplexity(Scorer(CFG, params, max_length=12), tok, [EXAMPLES["chat"]], stride=stride)
    assert m["tokens"] == sum(mask) and abs(m["loglikelihood"] - direct) < 1e-4


def test_masked_requests_score_each_masked_token_once_in_its_window():
    tokens = list(range(10, 40))
    mask = [(t // 4) % 2 for t in range(30)]
    pairs = masked_requests(tokens, mask, 1, 8, 3)
    assert [t for _, cont in pairs for t in cont] == [t for t, w in zip(tokens, mask) if w]
    full = [1] + tokens
    for context, cont in pairs:
        assert len(context) + len(cont) <= 9
        end = full.index(cont[-1]) + 1
        assert full[end - len(context) - len(cont):end] == context + cont  # contiguous, what came before
