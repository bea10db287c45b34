"""lm-evaluation-harness adapter: evaluate a llama_jax model with the harness's own tasks.

    pip install -e ".[eval]"
    from llama_jax.evaluation.harness import LlamaJaxLM
    lm = LlamaJaxLM.from_checkpoint("ckpt/")            # or LlamaJaxLM(config, params, tokenizer)
    lm_eval.simple_evaluate(model=lm, tasks=["piqa"])

lm_eval is imported when this module is, so the rest of llama_jax never needs it. Contexts
are encoded with bos (LLaMA's convention; `add_bos=False` gives the harness's HF default),
log-likelihoods come from our packed `Scorer`, rolling log-likelihoods from our windows
(the harness's disjoint windows), generation from `llama_jax.inference.generate` (greedy unless the
task asks for sampling).
"""
from __future__ import annotations

from typing import Sequence

from lm_eval.api.model import TemplateLM

from llama_jax.evaluation.perplexity import rolling_windows
from llama_jax.evaluation.scoring import Scorer


class LlamaJaxLM(TemplateLM):
    """A TemplateLM over a llama_jax (config, params) and a llama_jax.data.Tokenizer."""

    def __init__(self, config, params, tokenizer, *, add_bos: bool = True, max_gen_toks: int = 256,
                 mesh=None, **scorer_kwargs):
        super().__init__()
        self.config, self.params, self.tok, self.add_bos, self.mesh = config, params, tokenizer, add_bos, mesh
        self.max_gen_toks = max_gen_toks
        self.scorer = Scorer(config, params, mesh=mesh, **scorer_kwargs)

    @classmethod
    def from_checkpoint(cls, path: str, tokenizer: str | None = None, dtype: str | None = None, **kw) -> "LlamaJaxLM":
        """Loads a llama_jax checkpoint directory and its tokenizer.model."""
        from llama_jax.checkpoint import load_checkpoint, tokenizer_file
        from llama_jax.data import load_tokenizer
        config, params = load_checkpoint(path, dtype=dtype, mesh=kw.get("mesh"))
        return cls(config, params, load_tokenizer(str(tokenizer_file(path, tokenizer))), **kw)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id  # an empty context is conditioned on bos, as LLaMA prompts start

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos if add_special_tokens is None else add_special_tokens
        return self.tok.encode(string, bos=bos)

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self.scorer.loglikelihood([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for pair in rolling_windows(self.tok.encode(text, bos=False), self.tok.bos_id, self.max_length):
                pairs.append(pair)
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owners, self.scorer.loglikelihood(pairs)):
            totals[i] += ll
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from llama_jax.inference.generate import generate
        out = []
        for req in requests:  # one at a time: each request may carry its own stop strings and length
            context, kw = req.args
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.get("max_gen_toks", self.max_gen_toks))
            prompt = self.tok_encode(context)[-max(1, self.max_length - n):]  # keep the prompt's end
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            ids = generate(self.config, self.params, [prompt], n, temperature=temperature, mesh=self.mesh)[0]
            text = self.tok.decode(ids)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out
