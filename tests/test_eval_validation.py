"""eval.py checks its input before scoring and never reports a metric of nothing (issue 18.8)."""
import json

import numpy as np
import pytest

from llama_jax.data import DataError
from llama_jax.errors import InputError

from test_eval_cli import TEXT, _eval_module  # one loader of eval.py for both files


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import flax.linen as nn
    import jax
    import numpy as np
    from llama_jax import Llama, ModelConfig
    from llama_jax.checkpoint import save_params
    from llama_jax.data import train_tokenizer
    root = tmp_path_factory.mktemp("ev")
    train_tokenizer(TEXT, 300, str(root / "tok" / "tokenizer.model"))
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=300, multiple_of=16, max_seq_len=64)
    params = nn.unbox(Llama(cfg).init(jax.random.PRNGKey(0), np.ones((1, 4), np.int32))["params"])
    save_params(root / "ckpt", params, cfg, tokenizer_dir=root / "tok")
    return root


def _run(root, tmp_path, *extra):
    return _eval_module().main(["--checkpoint", str(root / "ckpt"), "--output", str(tmp_path / "r.json"), *extra])


@pytest.mark.parametrize("extra, pattern", [
    (["--limit", "0"], r"--limit: expected an integer >= 1, got 0"),
    (["--limit", "-1"], r"--limit: expected an integer >= 1, got -1"),
    (["--dtype", "int8"], r"--dtype: invalid choice: 'int8'"),
    (["--max-length", "0"], r"--max-length: expected an integer >= 1, got 0"),
    (["--max_length", "65"], r"--max-length: must fit the model's context \(expected 2\.\.64, got 65\)"),
    (["--stride", "100"], r"--stride: must be at most the context length \(expected <= 64, got 100\)"),
])
def test_bad_flags_refused(ckpt, tmp_path, extra, pattern):
    with pytest.raises(InputError, match=pattern):
        _run(ckpt, tmp_path, "--perplexity", "stdlib:eval", *extra)
    assert not (tmp_path / "r.json").exists()


def test_empty_corpus_is_no_perplexity(ckpt, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    for name in ("empty.txt", "blank.txt"):
        with pytest.raises(DataError, match="empty corpus"):
            _run(ckpt, tmp_path, "--perplexity", f"lines:{tmp_path / name}")
    from llama_jax.evaluation import perplexity
    with pytest.raises(DataError, match="no tokens to score"):
        perplexity(None, None, [])


def test_unwritable_output_fails_before_loading(ckpt, tmp_path):
    """The output is checked first: with a missing checkpoint too, the output is what is reported."""
    ev = _eval_module()
    with pytest.raises(InputError, match=r"--output .*r\.json: cannot write the result file"):
        ev.main(["--checkpoint", str(tmp_path / "nothing"), "--perplexity", "stdlib",
                 "--output", str(tmp_path / "no" / "such" / "dir" / "r.json")])
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(InputError, match="cannot write the result file"):
        ev.main(["--checkpoint", str(ckpt / "ckpt"), "--perplexity", "stdlib", "--output", str(tmp_path / "dir.json")])


def test_non_utf8_lines_score(ckpt, tmp_path):
    """Undecodable bytes become U+FFFD (one token each, few words): word perplexity is huge, or
    inf beyond float range, never an OverflowError after all the scoring."""
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe" * 300 + b"\n" + b"\x80\x81\x82" * 200 + b"\napple banana\n")
    assert _run(ckpt, tmp_path, "--perplexity", f"lines:{tmp_path / 'bin.txt'}") == 0
    ppl = json.loads((tmp_path / "r.json").read_text())["perplexity"]
    assert ppl["documents"] == 3 and ppl["tokens"] > 0 and ppl["token_perplexity"] > 1
    assert ppl["word_perplexity"] > ppl["token_perplexity"]


def test_scorer_refuses_lengths_beyond_context(ckpt):
    from llama_jax.evaluation import Scorer
    from llama_jax.checkpoint import load_checkpoint
    config, params = load_checkpoint(str(ckpt / "ckpt"))
    for bad in (0, 1, 65):
        with pytest.raises(ValueError, match="max_length"):
            Scorer(config, params, max_length=bad)


def test_bad_spec_or_task_fails_before_loading_without_output(ckpt, tmp_path, monkeypatch, capsys):
    """--output is optional; a bad --perplexity spec or task name is the error, before the checkpoint loads."""
    import llama_jax.checkpoint
    monkeypatch.setattr(llama_jax.checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("checkpoint loaded"))
    ev = _eval_module()
    with pytest.raises(InputError, match=r"perplexity source: unknown source kind 'txt'"):
        ev.main(["--checkpoint", str(ckpt / "ckpt"), "--perplexity", "txt:notes.txt"])
    with pytest.raises(InputError, match=r"no such directory"):
        ev.main(["--checkpoint", str(ckpt / "ckpt"), "--perplexity", f"pretokenized:{tmp_path / 'none'}"])
    with pytest.raises(ValueError, match="nope"):
        ev.main(["--checkpoint", str(ckpt / "ckpt"), "--tasks", "nope"])


def test_json_to_stdout_without_output(ckpt, tmp_path, capsys):
    (tmp_path / "a.txt").write_text(TEXT[0])
    assert _eval_module().main(["--checkpoint", str(ckpt / "ckpt"), "--perplexity", f"text:{tmp_path / 'a.txt'}"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["perplexity"]["documents"] == 1 and "token ppl" in err


def test_pretokenized_scores_the_same_tokens_as_text(ckpt, tmp_path):
    """pretokenized:DIR scores the stored ids: the token perplexity of the text they came from."""
    from llama_jax.data import load_tokenizer, pretokenize
    from llama_jax.data.spec import parse_source
    (tmp_path / "a.txt").write_text("\n".join(TEXT[:6]))
    tok = load_tokenizer(str(ckpt / "tok" / "tokenizer.model"))
    pretokenize(parse_source(f"text:{tmp_path / 'a.txt'}"), tok, str(tmp_path / "pre"))
    assert _run(ckpt, tmp_path, "--perplexity", f"text:{tmp_path / 'a.txt'}") == 0
    text = json.loads((tmp_path / "r.json").read_text())["perplexity"]
    assert _run(ckpt, tmp_path, "--perplexity", f"pretokenized:{tmp_path / 'pre'}") == 0
    pre = json.loads((tmp_path / "r.json").read_text())["perplexity"]
    assert pre["tokens"] == text["tokens"] and pre["token_perplexity"] == pytest.approx(text["token_perplexity"])
    assert pre["bits_per_byte"] is None and "not available" in pre["text_metrics"] or \
        pre["bits_per_byte"] == pytest.approx(text["bits_per_byte"], rel=0.05)
    # A tokenizer larger than the model, or ids beyond its vocabulary: one line, not a traceback.
    meta = json.loads((tmp_path / "pre" / "pretokenized.json").read_text())
    (tmp_path / "pre" / "pretokenized.json").write_text(json.dumps({**meta, "vocab_size": 1000}))
    with pytest.raises(InputError, match=r"larger than the model's vocabulary \(expected vocab_size <= 300, got 1000\)"):
        _run(ckpt, tmp_path, "--perplexity", f"pretokenized:{tmp_path / 'pre'}")
    from llama_jax.evaluation import Scorer, perplexity
    from llama_jax.checkpoint import load_checkpoint
    scorer = Scorer(*load_checkpoint(str(ckpt / "ckpt")))
    with pytest.raises(DataError, match="token id 300 is outside the model's vocabulary of 300"):
        perplexity(scorer, tok, [np.array([5, 300], np.int32)])
    no_text = perplexity(scorer, tok, [np.array([5, 6, 7], np.int32)], exact_ids=False)
    assert no_text["tokens"] == 3 and no_text["bits_per_byte"] is None and no_text["word_perplexity"] is None
