"""Fine-tuning data (llama_jax.data.sft): chat_jsonl and prompt_completion examples on tiny
SentencePiece (LLaMA 2) and tiktoken (LLaMA 3) tokenizers. The loss mask covers exactly the
answers (checked against encode_dialog/encode_answer); packing keeps examples whole with
their masks; the masked loss of a packed batch through a tiny model equals a direct
computation on the examples run alone; resume is exact mid-epoch; truncation and bad rows."""
import dataclasses
import json
import logging
import re

import jax
import numpy as np
import pytest

from llama_jax.data import BATCH_KEYS, DataConfig, DataError, Llama3Tokenizer, SourceConfig, make_dataset
from llama_jax.data import packing
from llama_jax.data.config import LossMask, SourceKind
from llama_jax.data.sft import SftExample, encode_example
from llama_jax.data.spec import parse_sources, to_spec
from llama_jax.errors import InputError
from llama_jax.inference.chat import encode_answer, encode_dialog
import tiny_tokenizers

S, U, A, I = "system", "user", "assistant", "ipython"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def m(role, content):
    return {"role": role, "content": content}


def _dialog(i):
    rng = np.random.default_rng(i)
    say = lambda: " ".join(rng.choice(WORDS, size=int(rng.integers(1, 7))))  # noqa: E731
    msgs = [m(S, say())] if i % 3 == 0 else []
    for _ in range(int(rng.integers(1, 4))):
        msgs += [m(U, say()), m(A, say())]
    return msgs


def _pair(i):
    rng = np.random.default_rng(1000 + i)
    return {"prompt": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 15)))),
            "completion": " " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 10))))}


_RNG = np.random.default_rng(0)
_TEXTS = [tiny_tokenizers.MARKUP + " ".join(_RNG.permutation(WORDS)) for _ in range(200)]  # chat words whole
sp, tik = tiny_tokenizers.fixtures(400, _TEXTS, tiny_tokenizers.MERGES[:21])


@pytest.fixture(params=["sp", "tik"])
def tok(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    (d / "chat.jsonl").write_text("".join(json.dumps({"messages": _dialog(i)}) + "\n" for i in range(60)))
    (d / "pc.jsonl").write_text("".join(json.dumps(_pair(i)) + "\n" for i in range(60)))
    return d


def _example(kind, body, mask=LossMask.ASSISTANT):
    return SftExample(SourceKind(kind), body, mask, "mem.jsonl", 0)


def test_chat_mask_covers_exactly_the_answers(tok):
    dialogs = [_dialog(i) for i in range(12)] + [[m(U, ""), m(A, "")], [m(S, " s "), m(U, "u"), m(A, " a ")]]
    if isinstance(tok, Llama3Tokenizer):
        dialogs.append([m(U, "6*7?"), m(A, "print(6*7)"), m(I, "42"), m(A, "42.")])
    for msgs in dialogs:
        answers = [i for i, x in enumerate(msgs) if x["role"] == A]
        for mode in LossMask:
            ids, w = encode_example(tok, _example("chat_jsonl", msgs, mode))
            assert ids.tolist() == encode_dialog(tok, msgs[:-1]) + encode_answer(tok, msgs[-1]["content"])
            want = np.zeros(len(ids), np.int32)
            for a in answers if mode is LossMask.ASSISTANT else answers[-1:]:
                start = len(encode_dialog(tok, msgs[:a]))  # the dialog grows by appending
                want[start:start + len(encode_answer(tok, msgs[a]["content"]))] = 1
            np.testing.assert_array_equal(w, want)
            assert ids[w == 1][-1] in (tok.eos_id, getattr(tok, "eot_id", tok.eos_id))


def test_prompt_completion_plain_and_conversational(tok):
    ids, w = encode_example(tok, _example("prompt_completion", ("Say hi.", " hello world")))
    p, c = tok.encode("Say hi.", bos=False), tok.encode(" hello world", bos=False)
    assert ids.tolist() == [tok.bos_id] + p + c + [tok.eos_id]
    assert w.tolist() == [0] * (1 + len(p)) + [1] * (len(c) + 1)
    prompt = [m(S, "be kind"), m(U, "hi"), m(A, "hello"), m(U, "bye")]
    for completion in ("ciao", [m(A, "ciao")]):
        ids, w = encode_example(tok, _example("prompt_completion", (prompt, completion)))
        want_ids, want_w = encode_example(tok, _example("chat_jsonl", prompt + [m(A, "ciao")], LossMask.LAST_ASSISTANT))
        assert ids.tolist() == want_ids.tolist() and w.tolist() == want_w.tolist()


def _cfg(files, shuffle=False, num_epochs=1, **kw):
    return DataConfig(sources=(SourceConfig(kind="chat_jsonl", path=str(files / "chat.jsonl"), **kw),
                               SourceConfig(kind="prompt_completion", path=str(files / "pc.jsonl"))),
                      shuffle=shuffle, num_epochs=num_epochs)


def _all_examples(tok, files, seq_len):
    """Every example's (ids, weights), truncated as the pipeline does (its last seq_len + 1)."""
    rows = [json.loads(x) for x in (files / "chat.jsonl").read_text().splitlines()]
    out = [encode_example(tok, _example("chat_jsonl", r["messages"])) for r in rows]
    rows = [json.loads(x) for x in (files / "pc.jsonl").read_text().splitlines()]
    out += [encode_example(tok, _example("prompt_completion", (r["prompt"], r["completion"]))) for r in rows]
    return [(ids[-seq_len - 1:], w[-seq_len - 1:]) for ids, w in out]


def _segments(batch, examples):
    """(row, token indices, example) of every segment, matched to the example it holds whole."""
    by_ids = {tuple(ids.tolist()): (ids, w) for ids, w in examples}
    out = []
    for r in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][r]
        for k in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == k)
            assert (np.diff(idx) == 1).all() and (batch["positions"][r, idx] == np.arange(len(idx))).all()
            head = batch["tokens"][r, idx].tolist()
            whole = head + [int(batch["targets"][r, idx[-1]])]
            ex = by_ids.get(tuple(whole)) if idx[-1] == seg.size - 1 else None
            ex = ex or by_ids[tuple(head)]  # KeyError: a split or altered example
            out.append((r, idx, ex))
    return out


def test_packing_keeps_examples_whole_with_their_masks(tok, files):
    examples = _all_examples(tok, files, 128)
    seen = []
    it = make_dataset(_cfg(files), tok, 128, 4, shard_index=0, shard_count=1)
    batches = list(it)
    assert 0 < it.stats.truncated_documents < 25
    for b in batches:
        assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
            k: ((4, 128), "float32" if k == "loss_mask" else "int32") for k in BATCH_KEYS}
        covered = np.zeros(b["loss_mask"].shape, bool)
        for r, idx, (ids, w) in _segments(b, examples):
            n = len(ids) - 1  # positions whose target lies inside the example
            np.testing.assert_array_equal(b["loss_mask"][r, idx[:n]], w[1:])
            covered[r, idx[:n]] = True
            seen.append(tuple(ids.tolist()))
        assert not b["loss_mask"][~covered].any()  # padding and example ends train nothing
    assert sorted(seen) == sorted(tuple(ids.tolist()) for ids, _ in examples)
    mask = np.concatenate([b["loss_mask"] for b in batches])
    assert 0.2 < mask.sum() / (np.concatenate([b["segment_ids"] for b in batches]) > 0).sum() < 0.8


def test_masked_loss_packed_equals_examples_alone(sp, tik, files):
    from llama_jax import Llama, ModelConfig
    from llama_jax.losses import masked_cross_entropy
    # One model for both tokenizers (a vocabulary holding both): two compilations in all.
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=max(sp.vocab_size, tik.vocab_size))
    model = Llama(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"]
    packed_logits = jax.jit(lambda t, p, s: model.apply({"params": params}, t, positions=p, segment_ids=s))
    alone_logits = jax.jit(lambda t: model.apply({"params": params}, t))
    for tok in (sp, tik):
        examples = _all_examples(tok, files, 128)
        batch = next(make_dataset(_cfg(files, shuffle=True), tok, 128, 4, seed=2, shard_index=0, shard_count=1))
        logits = packed_logits(batch["tokens"], batch["positions"], batch["segment_ids"])
        total, count = masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])
        # Each example alone, left-aligned (trailing zeros cannot reach it under the causal
        # mask), its loss written out: -log softmax at the target, weighted by the target's weight.
        segs = _segments(batch, examples)
        assert 4 <= len(segs) <= 24
        alone = np.zeros((24, 129), np.int32)
        for i, (_, _, (ids, _)) in enumerate(segs):
            alone[i, :len(ids)] = ids
        lg = np.asarray(alone_logits(alone), np.float64)
        lg = lg - lg.max(-1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        want = sum(-(logp[i, np.arange(len(ids) - 1), ids[1:]] * w[1:]).sum()
                   for i, (_, _, (ids, w)) in enumerate(segs))
        assert count == sum(w[1:].sum() for _, _, (_, w) in segs) > 0
        np.testing.assert_allclose(float(total), want, rtol=1e-5)


def test_resume_mid_epoch_with_masks(tok, files):
    cfg = DataConfig(sources=(SourceConfig(kind="chat_jsonl", path=str(files / "chat.jsonl"), weight=2.0),
                              SourceConfig(kind="prompt_completion", path=str(files / "pc.jsonl"))), read_threads=2)
    it = make_dataset(cfg, tok, 96, 2, seed=5, shard_index=0, shard_count=1)
    [next(it) for _ in range(13)]
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(30)]  # past the epoch's end too
    fresh = make_dataset(cfg, tok, 96, 2, seed=5, shard_index=0, shard_count=1)
    fresh.set_state(state)
    for a in expected:
        b = next(fresh)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    same_doc = np.concatenate([(b["segment_ids"] > 0) for b in expected])
    mask = np.concatenate([b["loss_mask"] for b in expected]) > 0
    assert mask.any() and (same_doc & ~mask).sum() > mask.sum() / 4  # the masks are not trivial


def test_long_examples_keep_their_end_counted_and_warned_once(tok, tmp_path, caplog):
    long = [m(U, " ".join(WORDS * 4)), m(A, "alpha beta")]
    rows = [long, [m(U, "hi"), m(A, "alpha")], long, long]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    cfg = DataConfig(sources=(SourceConfig(kind="chat_jsonl", path=str(tmp_path / "c.jsonl")),),
                     shuffle=False, num_epochs=1)
    ids, w = encode_example(tok, _example("chat_jsonl", long))
    assert len(ids) > 33
    with caplog.at_level(logging.WARNING, logger="llama_jax.data.packing"):
        it = make_dataset(cfg, tok, 32, 1, shard_index=0, shard_count=1)
        batches = list(it)
    assert it.stats.truncated_documents == 3
    lines = (tmp_path / "c.jsonl").read_bytes().splitlines(keepends=True)
    offsets = [sum(len(x) for x in lines[:i]) for i in (0, 2, 3)]  # the long rows' byte offsets
    assert it.stats.truncated_examples == {(str(tmp_path / "c.jsonl"), o) for o in offsets}
    warned = [r for r in caplog.records if "longer than a row" in r.getMessage()]
    # Tokenizing threads race for the first warning: any long row's file:line.
    assert len(warned) == 1 and re.match(rf"{re.escape(str(tmp_path / 'c.jsonl'))}:[134]: ", warned[0].getMessage())
    cut = [(b["tokens"][0], b["targets"][0], b["loss_mask"][0]) for b in batches if b["segment_ids"][0].max() == 1
           and b["segment_ids"][0].min() == 1]
    assert len(cut) == 3
    for t, y, lm in cut:  # the last 33 tokens, the answer and its end of turn trained
        np.testing.assert_array_equal(np.append(t, y[-1]), ids[-33:])
        np.testing.assert_array_equal(lm, w[-32:])


BAD_ROWS = [
    ({"text": "hi"}, "c.jsonl:2: no field 'messages'; the record has \\['text'\\]"),
    ({"messages": [m(U, "a"), m(U, "b"), m(A, "c")]}, "c.jsonl:2: messages\\[1\\]: .*alternate"),
    # the second answer in a row is the message named, with the rule it breaks
    ({"messages": [m(U, "a"), m(A, "b"), m(A, "c")]}, "c.jsonl:2: messages\\[2\\]: .*alternate .*"
                                                      "\\(expected user( or ipython)?, got 'assistant'\\)"),
    ({"messages": [m(S, "a"), m(A, "b")]}, "c.jsonl:2: messages\\[1\\]: .*alternate .*\\(expected user, got "),
    ({"messages": [m(U, "a"), m(A, "b"), m(U, "c"), m(S, "d"), m(A, "e")]},
     "c.jsonl:2: messages\\[3\\]: a system message may only come first"),
    ({"messages": [m(U, "a"), m(A, "b"), m(U, "c")]}, "c.jsonl:2: messages\\[2\\]: a training dialog ends with "
                                                      "the assistant's answer"),
    ({"messages": [m(U, "a"), m("bot", "b")]}, "c.jsonl:2: .*expected role 'assistant'"),
    ({"messages": [m(U, "a"), m(A, "b"), m(U, "c"), m("robot", "d"), m(A, "e")]},
     "c.jsonl:2: messages\\[3\\]: unknown role"),
    ({"messages": "hello"}, "c.jsonl:2: messages: a dialog is a non-empty list"),
    ({"messages": []}, "c.jsonl:2: messages: a dialog is a non-empty list"),
    ({"messages": [m(U, "a"), m(A, 3)]}, "c.jsonl:2: messages\\[1\\]: content must be a string"),
]


@pytest.mark.parametrize("row,match", BAD_ROWS)
def test_bad_chat_rows_name_file_line_and_message(tok, tmp_path, row, match):
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [m(U, "ok"), m(A, "ok")]}) + "\n"
                                      + json.dumps(row) + "\n")
    cfg = DataConfig(sources=(SourceConfig(kind="chat_jsonl", path=str(tmp_path / "c.jsonl")),), shuffle=False)
    with pytest.raises(DataError, match=match) as e:
        next(make_dataset(cfg, tok, 64, 2, shard_index=0, shard_count=1))
    assert "\n" not in e.value.args[0].split("\n-----")[0]  # (grain appends a note on its traceback filter)


def test_tool_results_between_answers_are_a_valid_llama3_dialog(tik):
    # user, assistant (a tool call), ipython (its result), assistant: alternation allows it
    ids, w = encode_example(tik, _example("chat_jsonl", [m(U, "a"), m(A, "b"), m("tool", "c"), m(A, "d")]))
    assert list(ids) == encode_dialog(tik, [m(U, "a"), m(A, "b"), m("tool", "c")]) + encode_answer(tik, "d")
    assert w.sum() == len(encode_answer(tik, "b")) + len(encode_answer(tik, "d"))


def test_bad_prompt_completion_rows(sp, tmp_path):
    path = tmp_path / "p.jsonl"
    for row, match in [({"prompt": "a"}, "p.jsonl:3: no field 'completion'"), ("not json", "p.jsonl:3: not valid JSON"),
                       ({"prompt": "a", "completion": 3}, "p.jsonl:3: completion: not a string"),
                       ({"prompt": [m(U, "a")], "completion": [m(U, "b")]}, "p.jsonl:3: completion: a conversational")]:
        path.write_text('{"prompt": "x", "completion": "y"}\n\n' + (row if isinstance(row, str) else json.dumps(row)))
        cfg = DataConfig(sources=(SourceConfig(kind="prompt_completion", path=str(path)),), shuffle=False)
        with pytest.raises(DataError, match=match):
            next(make_dataset(cfg, sp, 64, 2, shard_index=0, shard_count=1))


def test_custom_fields_through_the_spec(sp, tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"conv": [m(U, "a"), m(A, "b"), m(U, "c"), m(A, "d")]}) + "\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"q": "a", "ans": " b"}) + "\n")
    spec = f"chat_jsonl:{tmp_path}/c.jsonl#conv:last_assistant,2*prompt_completion:{tmp_path}/p.jsonl#q:ans"
    sources = parse_sources(spec)
    assert sources[0].messages_field == "conv" and sources[0].loss_mask is LossMask.LAST_ASSISTANT
    assert (sources[1].prompt_field, sources[1].completion_field, sources[1].weight) == ("q", "ans", 2.0)
    assert parse_sources(",".join(to_spec(s, with_weight=True) for s in sources)) == sources
    assert parse_sources("chat_jsonl:x.jsonl")[0].loss_mask is LossMask.ASSISTANT
    batch = next(make_dataset(DataConfig(sources=sources[:1], shuffle=False), sp, 64, 1, shard_index=0, shard_count=1))
    ids, w = encode_example(sp, _example("chat_jsonl", [m(U, "a"), m(A, "b"), m(U, "c"), m(A, "d")],
                                         LossMask.LAST_ASSISTANT))
    np.testing.assert_array_equal(batch["loss_mask"][0, :len(ids) - 1], w[1:])
    for bad in ("chat_jsonl:x.jsonl#messages:inverted", "prompt_completion:x.jsonl#q"):
        with pytest.raises(InputError, match="source spec"):
            parse_sources(bad)


def test_all_zero_masks_are_errors(sp, files, monkeypatch):
    real = packing.encode_example
    monkeypatch.setattr(packing, "encode_example", lambda t, ex: (real(t, ex)[0], np.zeros_like(real(t, ex)[1])))
    with pytest.raises(DataError, match="chat.jsonl:1: no token to train on"):
        next(make_dataset(_cfg(files), sp, 64, 2, shard_index=0, shard_count=1))
    monkeypatch.setattr(packing, "encode_example", real)
    real_row = packing.row_to_example
    monkeypatch.setattr(packing, "row_to_example", lambda r: {**real_row(r), "loss_mask": np.zeros(64, np.float32)})
    with pytest.raises(DataError, match="a batch of 0:chat_jsonl:.*chat.jsonl, 1:prompt_completion:.*has no token"):
        next(make_dataset(_cfg(files), sp, 64, 2, shard_index=0, shard_count=1))


def test_fine_tuning_sources_feed_tokenizer_training_not_pretokenize(sp, files, tmp_path):
    from llama_jax.data import pretokenize
    from llama_jax.data.tokenizer_training import _documents
    src = SourceConfig(kind="chat_jsonl", path=str(files / "chat.jsonl"))
    docs = list(_documents(src))
    assert len(docs) == 60 and all(isinstance(t, str) for t in docs)
    assert "\n".join(x["content"] for x in _dialog(0)) in docs
    with pytest.raises(DataError, match="pretokenize: fine-tuning sources .*chat_jsonl"):
        pretokenize(src, sp, str(tmp_path / "pt"))


def test_a_run_counts_each_cut_example_once_and_says_so_at_its_end(sp, tmp_path):
    from llama_jax.data.input import ShardedInput
    from llama_jax.train.console import final_lines
    long = [m(U, " ".join(WORDS * 4)), m(A, "alpha beta")]
    rows = [long, [m(U, "hi"), m(A, "alpha")], long]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    cfg = DataConfig(sources=(SourceConfig(kind="chat_jsonl", path=str(tmp_path / "c.jsonl")),), shuffle=False)
    it = ShardedInput(cfg, sp, 32, 1, 0, 1, sharding=None)
    for _ in range(8):  # several epochs: the same two rows are cut again and again
        it.next_local()
    reads = sum(x.stats.truncated_documents for x in it._its.values())
    assert reads > 2 and it.truncated_examples() == 2
    lines = final_lines({"step": 8, "truncated_examples": 2}, "w")
    assert "truncated: 2 fine-tuning examples longer than seq_len + 1 tokens kept their last seq_len + 1" in lines[1]
    assert not any(line.startswith("truncated") for line in final_lines({"step": 8}, "w"))
