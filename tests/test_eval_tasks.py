"""Multiple-choice tasks: prompt formats, local JSONL loading, bad input, and the metrics on
tiny hand-made tasks whose right answers are known (a designed scorer, and a real model
built to be a unigram language model)."""
import json

import numpy as np
import pytest

from llama_jax import ModelConfig
from llama_jax.data import DataError, train_tokenizer
from llama_jax.evaluation import Scorer, encode_pair, evaluate_docs, get_task, load_docs
from llama_jax.evaluation.tasks import hellaswag_preprocess

CORPUS = ["apple banana cherry grape lemon mango orange peach pear plum", "Question: Answer: yes no maybe",
          "the cat sat on the mat and the dog ate the bone", "zzz qqq xxx vvv kkk jjj www"] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(CORPUS, vocab_size=300, output_path=str(tmp_path_factory.mktemp("tok") / "t.model"))


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_prompt_formats_follow_lm_eval():
    d = get_task("boolq").to_doc({"passage": "P.", "question": "is it", "label": 1})
    assert d.contexts == ("P.\nQuestion: is it?\nAnswer:",) and d.choices == ("no", "yes") and d.gold == 1
    d = get_task("siqa").to_doc({"context": "C.", "question": "Q?", "answerA": "a", "answerB": "b",
                                 "answerC": "c", "label": "3"})
    assert d.contexts == ("Q: C. Q?\nA:",) and d.gold == 2
    d = get_task("hellaswag").to_doc({"ctx_a": "A man [title] runs.", "ctx_b": "he", "activity_label": "Run",
                                      "endings": ["[step] fast.", " slow "], "label": "1"})
    assert d.contexts == ("Run: A man. runs. He",) and d.choices == (" fast.", "slow") and d.gold == 1  # as the harness leaves it
    assert hellaswag_preprocess(" a [header] b c ") == "a b c"
    d = get_task("winogrande").to_doc({"sentence": "Tom gave Bob it because _ was kind.", "option1": "Tom",
                                       "option2": "Bob", "answer": "2"})
    assert d.contexts == ("Tom gave Bob it because Tom", "Tom gave Bob it because Bob")
    assert d.choices == ("was kind.",) and d.gold == 1
    d = get_task("arc_e").to_doc({"question": "Q", "choices": {"text": ["x", "y"], "label": ["1", "2"]}, "answerKey": "2"})
    assert d.contexts == ("Question: Q\nAnswer:",) and d.gold == 1
    d = get_task("obqa").to_doc({"question_stem": "Q", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
                                 "answerKey": " B"})
    assert d.contexts == ("Q",) and d.gold == 1


def test_encode_pair_moves_the_space_and_splits_the_whole_encoding(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Question: apple ", "banana")
    assert ctx == tokenizer.encode("Question: apple") and ctx + cont == tokenizer.encode("Question: apple banana")
    ctx, cont = encode_pair(tokenizer, "", "apple")
    assert ctx == [tokenizer.bos_id] and cont == tokenizer.encode("apple", bos=False)


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope'; known: boolq, piqa, siqa, hellaswag"):
        get_task("nope")
    with pytest.raises(DataError, match=r"siqa.*looked for.*siqa/validation.jsonl.*TFDS has no siqa"):
        load_docs(get_task("siqa"), data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"piqa.*no local file.*TFDS failed: TFDS piqa\[validation\]"):
        load_docs(get_task("piqa"), data_dir=str(tmp_path), tfds_data_dir=str(tmp_path / "tfds"))
    p = tmp_path / "piqa" / "validation.jsonl"
    write_jsonl(p, [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}])
    p.write_text(p.read_text() + "\n{not json\n")
    with pytest.raises(DataError, match=r"validation.jsonl:3: not valid JSON"):
        load_docs(get_task("piqa"), data_dir=str(tmp_path))
    write_jsonl(p, [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "g", "sol1": "a"}])
    with pytest.raises(DataError, match=r"validation.jsonl:2: not a piqa row.*sol2"):
        load_docs(get_task("piqa"), data_dir=str(tmp_path))


class DesignedScorer:
    """Returns log-likelihoods from a table keyed by (unconditional?, continuation text)."""
    max_length = 128

    def __init__(self, tokenizer, table):
        self.tok, self.table, self.seen = tokenizer, table, []

    def loglikelihood(self, requests, progress=None):
        out = []
        for ctx, cont in requests:
            uncond = self.tok.decode(ctx) == "Answer:"
            self.seen.append((uncond, self.tok.decode(cont).strip()))
            out.append((self.table[self.seen[-1]], False))
        return out


def test_acc_acc_norm_and_paper_normalisation_on_designed_scores(tokenizer, tmp_path):
    # OBQA: doc 1's gold is the long choice (best per character, not in sum); doc 2's gold is
    # the choice that is likely only given the question (best after dividing by P(x | "Answer:")).
    write_jsonl(tmp_path / "openbookqa" / "test.jsonl", [
        {"question_stem": "pick", "choices": {"text": ["plum", "apple banana"], "label": ["A", "B"]}, "answerKey": "B"},
        {"question_stem": "pick", "choices": {"text": ["pear", "lemon"], "label": ["A", "B"]}, "answerKey": "A"},
    ])
    table = {(False, "plum"): -3.0, (False, "apple banana"): -4.0, (True, "plum"): -3.0, (True, "apple banana"): -9.0,
             (False, "pear"): -6.0, (False, "lemon"): -5.0, (True, "pear"): -9.0, (True, "lemon"): -2.0}
    task = get_task("openbookqa")
    docs = load_docs(task, data_dir=str(tmp_path))
    scorer = DesignedScorer(tokenizer, table)
    m = evaluate_docs(scorer, tokenizer, task, docs)
    # acc: doc1 picks plum (wrong), doc2 lemon (wrong). acc_norm: doc1 -4/12 > -3/4 (right),
    # doc2 -6/4 < -5/5 (wrong). paper: doc1 -4+9 > 0 (right), doc2 -6+9=3 > -5+2 (right).
    assert (m["acc"], m["acc_norm"], m["acc_paper"], m["n"]) == (0.0, 0.5, 1.0, 2)
    assert m["paper_metric"] == "acc_paper"
    assert sum(u for u, _ in scorer.seen) == 4  # one unconditional request per distinct choice
    # Tasks without the paper's normalisation do not ask for it.
    write_jsonl(tmp_path / "piqa" / "validation.jsonl", [{"goal": "g", "sol1": "plum", "sol2": "apple banana", "label": 1}])
    m = evaluate_docs(DesignedScorer(tokenizer, table), tokenizer, get_task("piqa"), load_docs(get_task("piqa"), data_dir=str(tmp_path)))
    assert "acc_paper" not in m and (m["acc"], m["acc_norm"]) == (0.0, 1.0)


def unigram_model(tokenizer, favoured):
    """A real LLaMA whose every next-token distribution is the same designed unigram: the
    residual stream is the embedding (attention and MLP outputs zeroed), whose dimension 0
    is a constant, and the output reads only that dimension."""
    import jax
    import flax.linen as nn
    from llama_jax import Llama
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tokenizer.vocab_size, multiple_of=16, max_seq_len=64)
    params = nn.unbox(Llama(cfg).init(jax.random.PRNGKey(0), np.ones((1, 4), np.int32))["params"])
    params = jax.tree.map(lambda x: np.array(x, copy=True), params)
    layers = params["layers"]
    layers["attention"]["wo"][:] = 0.0
    layers["feed_forward"]["w2"][:] = 0.0
    params["tok_embeddings"][:] = 0.0
    params["tok_embeddings"][:, 0] = 1.0
    params["norm"]["weight"][:] = 0.0
    params["norm"]["weight"][0] = 1.0
    logits = np.full(cfg.vocab_size, -10.0, np.float32)
    logits[list(favoured)] = 0.0
    params["output"][:] = 0.0
    params["output"][0] = logits
    return cfg, params


def test_real_model_picks_the_designed_answers(tokenizer, tmp_path):
    right = ["apple banana", "cherry", "mango peach pear"]
    wrong = ["zzz qqq", "apple xxx", "kkk"]
    favoured = {t for s in right for t in tokenizer.encode(" " + s, bos=False)}
    favoured |= {t for s in right for t in tokenizer.encode("g " + s, bos=False)}
    assert all(set(tokenizer.encode(" " + s, bos=False)) - favoured for s in wrong)
    rows = [{"goal": "g", "sol1": w, "sol2": r, "label": 1} for r, w in zip(right, wrong)]
    rows += [{"goal": "g", "sol1": r, "sol2": w, "label": 0} for r, w in zip(right, wrong)]
    write_jsonl(tmp_path / "piqa_validation.jsonl", rows)
    cfg, params = unigram_model(tokenizer, favoured)
    task = get_task("piqa")
    m = evaluate_docs(Scorer(cfg, params), tokenizer, task, load_docs(task, data_dir=str(tmp_path)))
    assert (m["acc"], m["acc_norm"], m["n"]) == (1.0, 1.0, 6)
    # Few-shot prompts from a train split change the contexts, not the unigram answers.
    train = load_docs(task, split="validation", data_dir=str(tmp_path))
    m = evaluate_docs(Scorer(cfg, params), tokenizer, task, train, num_fewshot=2, train_docs=train)
    assert m["acc"] == 1.0


def test_tfds_records_are_converted_to_the_same_docs(monkeypatch):
    """TFDS rows (bytes, numpy, ClassLabel ints) -> the docs the Hugging Face rows give."""
    import tensorflow_datasets as tfds
    records = {
        "ai2_arc/ARC-Easy": {"question": b"Q", "answerKey": np.int64(1),
                             "choices": {"text": np.array([b"x", b"y"], object), "label": np.array([0, 1])}},
        "openbookqa": {"question": {"stem": b"S", "choice_A": b"a", "choice_B": b"b", "choice_C": b"c",
                                    "choice_D": b"d"}, "answerKey": np.int64(2)},
        "winogrande": {"sentence": b"A _ b.", "option1": b"x", "option2": b"y", "label": np.int64(0)},
        "bool_q": {"passage": b"P.", "question": b"q", "answer": np.bool_(True), "title": b"t"},
        "hellaswag": {"context": b"A man runs.", "activity_label": b"Run", "endings": np.array([b"x", b"y"], object),
                      "label": np.int32(1)},
    }
    seen = []
    monkeypatch.setattr(tfds, "data_source", lambda name, split, data_dir, download: seen.append(split) or [records[name]])
    docs = {n: load_docs(get_task(n))[0] for n in ("arc_easy", "openbookqa", "winogrande", "boolq", "hellaswag")}
    assert docs["arc_easy"].choices == ("x", "y") and docs["arc_easy"].gold == 1
    assert docs["openbookqa"].contexts == ("S",) and docs["openbookqa"].choices == ("a", "b", "c", "d")
    assert docs["openbookqa"].gold == 2
    assert docs["winogrande"].contexts == ("A x", "A y") and docs["winogrande"].gold == 0
    assert docs["boolq"].gold == 1 and docs["hellaswag"].contexts == ("Run: A man runs.",)
    assert seen[:2] == ["test", "test"] and seen[2] == "validation"
    load_docs(get_task("winogrande"), split="train")
    assert seen[-1] == "train_xl"
