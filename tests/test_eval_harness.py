"""lm-evaluation-harness through our adapter gives the numbers of our native run.

Skipped when lm_eval is not installed (the optional `eval` extra, which CI and README's
test command install). Only our task directory is indexed (`include_defaults=False`): the
harness's own ~14,000 task YAMLs take a minute to index.
"""
import json
import os

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

import flax.linen as nn  # noqa: E402

from llama_jax import Llama, ModelConfig  # noqa: E402
from llama_jax.data import train_tokenizer  # noqa: E402
from llama_jax.evaluation import Scorer, encode_pair, evaluate_docs, get_task, load_docs, perplexity  # noqa: E402
from llama_jax.evaluation.harness import LlamaJaxLM  # noqa: E402

WORDS = "apple banana cherry grape lemon mango orange peach pear plum the cat sat on a mat".split()


def _init(cfg, seed):
    """Random params in numpy from the abstract shapes (nothing to compile); norms around 1."""
    from llama_jax.model import param_shapes
    rng = np.random.default_rng(seed)
    def leaf(path, s):
        base = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
        return (base + 0.1 * rng.standard_normal(s.shape)).astype(s.dtype)
    return jax.tree_util.tree_map_with_path(leaf, nn.unbox(param_shapes(cfg)))


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    pick = lambda k: " ".join(rng.choice(WORDS, k))  # noqa: E731
    return [{"goal": pick(6), "sol1": pick(int(rng.integers(1, 5))), "sol2": pick(int(rng.integers(1, 5))),
             "label": int(rng.integers(0, 2))} for _ in range(n)]


YAML = """task: piqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_harness_through_adapter_equals_native(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    tok = train_tokenizer([" ".join(WORDS)] * 30 + ["Question: Answer:"] * 5, 300, str(tmp_path / "t.model"))
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=300, multiple_of=32, max_seq_len=64)
    params = _init(cfg, 1)
    rows = _rows(16)
    data = tmp_path / "piqa" / "validation.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "piqa_local.yaml").write_text(YAML.format(path=data))

    from lm_eval.tasks import TaskManager
    lm = LlamaJaxLM(cfg, params, tok)
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    # torch_random_seed=None: our model has no torch state, and importing torch takes seconds.
    out = lm_eval.simple_evaluate(model=lm, tasks=["piqa_local"], task_manager=tasks, log_samples=True,
                                  bootstrap_iters=0, torch_random_seed=None)
    theirs = out["results"]["piqa_local"]

    task = get_task("piqa")
    docs = load_docs(task, data_dir=str(tmp_path))
    scorer = Scorer(cfg, params)
    ours = evaluate_docs(scorer, tok, task, docs)
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]
    # Per request: the harness's log-likelihoods are ours, to float precision.
    samples = sorted(out["samples"]["piqa_local"], key=lambda s: s["doc_id"])
    for s, doc in zip(samples, docs):
        native = scorer.loglikelihood([encode_pair(tok, doc.contexts[0], " " + c) for c in doc.choices])
        np.testing.assert_allclose([r[0][0] for r in s["resps"]], [ll for ll, _ in native], rtol=1e-6, atol=1e-5)

    # Rolling log-likelihood (the harness's perplexity path) equals our perplexity's.
    from lm_eval.api.instance import Instance
    texts = [" ".join(WORDS * 9), "the cat sat"]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    rolling = lm.loglikelihood_rolling(reqs)
    assert abs(sum(rolling) - perplexity(scorer, tok, texts)["loglikelihood"]) < 1e-3


def test_generate_until_is_greedy_generation_cut_at_the_stop_string(tmp_path):
    from lm_eval.api.instance import Instance
    from llama_jax import generate
    tok = train_tokenizer([" ".join(WORDS)] * 30, 300, str(tmp_path / "t.model"))
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=300, multiple_of=32, max_seq_len=64)
    params = _init(cfg, 2)
    lm = LlamaJaxLM(cfg, params, tok)
    full = tok.decode(generate(cfg, params, [tok.encode("the cat")], 12)[0])
    stop = full[len(full) // 2:][:2]
    assert stop
    req = Instance("generate_until", {}, ("the cat", {"until": [stop], "max_gen_toks": 12}), 0)
    assert lm.generate_until([req]) == [full.split(stop)[0]]
