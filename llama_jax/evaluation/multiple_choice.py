"""Multiple-choice scoring: requests from docs, and acc / acc_norm / the paper's normalisation.

Tokenisation follows lm-evaluation-harness's causal models: trailing spaces of the context
move to the continuation, context + continuation is encoded whole (with bos) and split at
the length of the encoded context, so the continuation's first token is the one the model
would really see.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import numpy as np

from llama_jax.evaluation.tasks import Doc, Task

PAPER_CONTEXT = "Answer:"  # the paper divides by P(completion | "Answer:") for BoolQ and OBQA


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with bos, continuation ids), split as lm-evaluation-harness splits them."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:
        return [tokenizer.bos_id], tokenizer.encode(continuation, bos=False)
    ctx = tokenizer.encode(context, bos=True)
    whole = tokenizer.encode(context + continuation, bos=True)
    return ctx, whole[len(ctx):]


def n_options(doc: Doc) -> int:
    return max(len(doc.contexts), len(doc.choices))


def option(doc: Doc, i: int) -> tuple[str, str]:
    """(context, choice) of option i: WinoGrande varies the context, other tasks the choice."""
    return doc.contexts[i if len(doc.contexts) > 1 else 0], doc.choices[i if len(doc.choices) > 1 else 0]


def fewshot_prefix(train_docs: Sequence[Doc], k: int, rng: random.Random) -> str:
    """k solved examples from the train split, joined as lm-evaluation-harness joins them."""
    if k <= 0:
        return ""
    shots = rng.sample(list(train_docs), min(k, len(train_docs)))
    return "".join(f"{c} {x}\n\n" for c, x in (option(d, d.gold) for d in shots))


def doc_metrics(doc: Doc, lls: Sequence[float], uncond: Sequence[float] | None = None) -> dict[str, float]:
    """0/1 per metric for one doc: acc (sum of log-probs), acc_norm (per character of the
    choice), acc_paper (minus log P(choice | "Answer:")) when `uncond` is given."""
    lls = np.asarray(lls, np.float64)
    chars = np.array([len(option(doc, i)[1]) for i in range(len(lls))], np.float64)
    out = {"acc": float(np.argmax(lls) == doc.gold), "acc_norm": float(np.argmax(lls / chars) == doc.gold)}
    if uncond is not None:
        out["acc_paper"] = float(np.argmax(lls - np.asarray(uncond, np.float64)) == doc.gold)
    return out


def aggregate(per_doc: Sequence[dict[str, float]]) -> dict[str, float]:
    """Means, with the standard error of the mean (as the harness reports it)."""
    out: dict[str, float] = {"n": len(per_doc)}
    for key in per_doc[0]:
        x = np.array([d[key] for d in per_doc], np.float64)
        out[key] = float(x.mean())
        out[f"{key}_stderr"] = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0
    return out


def evaluate_docs(scorer, tokenizer, task: Task, docs: Sequence[Doc], *, num_fewshot: int = 0,
                  train_docs: Sequence[Doc] = (), seed: int = 1234,
                  progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Scores every option of every doc in one batched pass and returns the task's metrics."""
    rng = random.Random(seed)
    requests, spans, uncond_index = [], [], {}
    for doc in docs:
        prefix = fewshot_prefix(train_docs, num_fewshot, rng)
        start = len(requests)
        for i in range(n_options(doc)):
            c, x = option(doc, i)
            requests.append(encode_pair(tokenizer, prefix + c, " " + x))
        spans.append((start, len(requests)))
    if task.paper_norm:  # one request per distinct choice text: BoolQ has only "no" and "yes"
        for doc in docs:
            for i in range(n_options(doc)):
                x = option(doc, i)[1]
                if x not in uncond_index:
                    uncond_index[x] = len(requests)
                    requests.append(encode_pair(tokenizer, PAPER_CONTEXT, " " + x))
    lls = [ll for ll, _ in scorer.loglikelihood(requests, progress=progress)]
    per_doc = []
    for doc, (a, b) in zip(docs, spans):
        uncond = [lls[uncond_index[option(doc, i)[1]]] for i in range(n_options(doc))] if task.paper_norm else None
        per_doc.append(doc_metrics(doc, lls[a:b], uncond))
    out = aggregate(per_doc)
    out["paper_metric"] = task.paper_metric
    return out
