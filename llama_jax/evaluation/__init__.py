"""Evaluation: log-likelihood scoring, rolling perplexity, the paper's multiple-choice tasks.

Entry points:
  Scorer(config, params, max_length=None, tokens_per_batch=4096, pack_length=256, mesh=None)
      .loglikelihood([(context_ids, continuation_ids), ...]) -> [(sum log p, is_greedy), ...]
  perplexity(scorer, tokenizer, documents, stride=None) -> {token_perplexity, bits_per_byte,
      word_perplexity, tokens, bytes, words, documents, loglikelihood}
  rolling_windows(tokens, bos, max_length, stride=None), parse_source(spec, data_dir)
  TASKS, get_task(name), load_docs(task, split=None, data_dir=None, tfds_data_dir=None)
  evaluate_docs(scorer, tokenizer, task, docs, num_fewshot=0, train_docs=(), seed=1234)
      -> {n, acc, acc_norm, [acc_paper], *_stderr, paper_metric}
  llama_jax.evaluation.harness.LlamaJaxLM: lm-evaluation-harness adapter (pip install lm-eval).
"""
from llama_jax.evaluation.multiple_choice import encode_pair, evaluate_docs
from llama_jax.evaluation.perplexity import parse_source, perplexity, rolling_windows
from llama_jax.evaluation.scoring import Scorer
from llama_jax.evaluation.tasks import ALIASES, TASKS, Doc, Task, get_task, load_docs

__all__ = ["ALIASES", "Doc", "Scorer", "TASKS", "Task", "encode_pair", "evaluate_docs", "get_task",
           "load_docs", "parse_source", "perplexity", "rolling_windows"]
