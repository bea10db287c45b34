"""Packing never lets a document see another, checked through the model: each document
piece's logits inside a packed row equal its logits when run alone."""
import json

import jax
import numpy as np
import pytest

from llama_jax.data import DataConfig, SourceConfig, check_vocab, make_dataset, train_tokenizer


@pytest.fixture(scope="module")
def packed_batch(tmp_path_factory):
    d = tmp_path_factory.mktemp("packed")
    rng = np.random.default_rng(0)
    words = "for while return def class import yield lambda if else 0 1 2 3".split()
    docs = [" ".join(rng.choice(words, size=int(rng.integers(2, 30)))) for _ in range(200)]
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok = train_tokenizer(docs * 3, 300, str(d / "tok.model"))
    cfg = DataConfig(sources=(SourceConfig(kind="jsonl", path=str(d / "docs.jsonl")),))
    return tok, next(make_dataset(cfg, tok, seq_len=48, global_batch_size=4, seed=0, shard_index=0, shard_count=1))


def test_each_document_sees_only_itself(packed_batch):
    from llama_jax import Llama, ModelConfig
    tok, batch = packed_batch
    cfg = ModelConfig.preset("tiny")
    check_vocab(tok, cfg.vocab_size)
    model = Llama(cfg)
    params = model.init(jax.random.PRNGKey(0), batch["tokens"][:1])["params"]
    packed = np.asarray(model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                                    segment_ids=batch["segment_ids"]))
    unmasked = np.asarray(model.apply({"params": params}, batch["tokens"]))
    # Each piece alone, left-aligned in its own row; trailing filler cannot reach it under
    # the causal mask, so all pieces run in one call (one compilation).
    where = [(r, np.flatnonzero(batch["segment_ids"][r] == k))
             for r in range(batch["tokens"].shape[0]) for k in range(1, batch["segment_ids"][r].max() + 1)]
    alone_tokens = np.zeros((len(where), batch["tokens"].shape[1]), np.int32)
    for i, (r, idx) in enumerate(where):
        alone_tokens[i, :len(idx)] = batch["tokens"][r, idx]
    alone = np.asarray(model.apply({"params": params}, alone_tokens))
    pieces = crossed = 0
    for i, (r, idx) in enumerate(where):
        np.testing.assert_allclose(packed[r, idx], alone[i, :len(idx)], rtol=1e-5, atol=1e-5)
        pieces += 1
        # Without segment ids and positions, later documents would see earlier ones:
        # the check above can fail.
        crossed += idx[0] > 0 and not np.allclose(unmasked[r, idx], alone[i, :len(idx)], rtol=1e-5, atol=1e-5)
    assert pieces >= 8 and crossed >= 4
    assert (batch["segment_ids"][:, 0] == 1).all() and batch["loss_mask"].sum() > 0.8 * batch["loss_mask"].size
