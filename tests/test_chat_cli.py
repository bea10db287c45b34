"""`python -m llama_jax chat` driven through a pseudo-terminal (pexpect) on a tiny random
checkpoint: streamed answers and the tokens/s line, a second turn that prefills only its
new ids, Ctrl-C during a long answer (the prompt comes back, the conversation goes on),
/reset, /system, /exit."""
import contextlib
import dataclasses
import glob
import os
import re
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from llama_jax import Llama, ModelConfig
from llama_jax.checkpoint import save_params
from llama_jax.inference.chat import encode_dialog, encode_next_turn

pexpect = pytest.importorskip("pexpect")
# pexpect forks this (JAX-loaded) process only to exec the CLI at once.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
pytest.importorskip("sentencepiece")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATS = re.compile(r"\[(\d+) tokens, ([\d.]+) tok/s([^\]]*)\]")
USER = lambda text: {"role": "user", "content": text}  # noqa: E731
LOG = os.environ.get("CHAT_CLI_LOG", os.devnull)  # set it to see the session
PREFILL = re.compile(r"\[prefilled (\d+) ids at slot (\d+) in \d+ ms; cache (\d+)/(\d+) slots\]")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model that never says eos (greedy): its eos logit is 0 while some other is always
    higher; a long context so that an answer runs until Ctrl-C."""
    from llama_jax.data import train_tokenizer
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), max_seq_len=1 << 15)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:40]
    tok = train_tokenizer([open(f, errors="ignore").read() for f in files], 512, str(path) + ".model")
    params = nn.unbox(Llama(cfg).init(jax.random.PRNGKey(0), np.ones((1, 8), np.int32))["params"])
    params = jax.tree.map(np.array, params)
    params["output"][:, tok.eos_id] = 0.0
    save_params(path, params, cfg)
    os.replace(str(path) + ".model", path / "tokenizer.model")
    return str(path), tok


@contextlib.contextmanager
def _chat(path, *flags):
    """The CLI in a pseudo-terminal, closed whatever the test does."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    child = pexpect.spawn(sys.executable, ["-m", "llama_jax", "chat", "--checkpoint", path, "--temperature", "0",
                                           "--verbose", *flags], cwd=ROOT, env=env, encoding="utf-8", timeout=240,
                          dimensions=(50, 2000), logfile=open(LOG, "w"))
    try:
        yield child
    finally:
        child.close(force=True)


def _exit(child, eof=False):
    """/exit (or Ctrl-D with eof): the CLI ends, with status 0."""
    child.sendeof() if eof else child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def _turn(child, text):
    """Send a message; (streamed text, stats match, prefill match)."""
    child.sendline(text)
    child.expect(STATS)
    answer, stats = child.before, child.match
    child.expect(PREFILL)
    prefill = child.match
    child.expect_exact("\r\n> ")
    return answer, stats, prefill


def test_terminal_chat(checkpoint):
    path, tok = checkpoint
    with _chat(path, "--max-new-tokens", "16", "--system", "Be brief.") as child:
        child.expect_exact("/exit")
        child.expect_exact("> ")
        answer, stats, prefill = _turn(child, "hello there")
        first = encode_dialog(tok, [{"role": "system", "content": "Be brief."}, USER("hello there")])
        assert int(stats[1]) == 16 and float(stats[2]) > 0 and "max tokens" in stats[3]
        assert len(answer.strip()) > 0 and answer.endswith("\r\n")  # the text streamed before the stats line
        assert (int(prefill[1]), int(prefill[2])) == (len(first), 0)
        filled = int(prefill[3])
        assert filled == len(first) + 16 + 1  # the answer, closed with eos

        # The second turn prefills only its own ids, right after the first turn's.
        _, stats, prefill = _turn(child, "and then?")
        assert (int(prefill[1]), int(prefill[2])) == (len(encode_next_turn(tok, [USER("and then?")])), filled)

        # Ctrl-C at the prompt keeps the session too.
        child.sendintr()
        child.expect_exact("> ")

        child.sendline("/reset")
        child.expect_exact("[conversation reset]")
        _, _, prefill = _turn(child, "hello there")
        assert (int(prefill[1]), int(prefill[2])) == (len(first), 0)  # the system message kept
        child.sendline("/system")
        child.expect_exact("no system message]")
        _, _, prefill = _turn(child, "hello there")
        assert int(prefill[1]) == len(encode_dialog(tok, [USER("hello there")]))
        _exit(child)


def _interrupt(child, text):
    """Send a message, Ctrl-C once the answer streams; (stats, prefill) matches."""
    child.sendline(text)
    child.expect_exact(text + "\r\n")  # the terminal's echo
    child.expect(r"[^\r\n]{20}")  # streaming has started
    child.sendintr()
    child.expect(STATS)
    stats = child.match
    child.expect(PREFILL)
    prefill = child.match
    child.expect_exact("\r\n> ")
    return stats, prefill


def test_ctrl_c_stops_the_answer_and_keeps_the_conversation(checkpoint):
    """Answers of up to 32k tokens from a model that never says eos: Ctrl-C ends each, the
    prompt comes back, and the next turn prefills only its ids, after the cut answer + eos."""
    path, tok = checkpoint
    with _chat(path, "--max-new-tokens", "30000") as child:
        child.expect_exact("> ")
        stats, prefill = _interrupt(child, "tell me everything")
        first = len(encode_dialog(tok, [USER("tell me everything")]))
        assert "interrupted" in stats[3] and 0 < int(stats[1]) < 30000
        assert (int(prefill[1]), int(prefill[2])) == (first, 0)
        filled = int(prefill[3])
        assert filled == first + int(stats[1]) + 1  # what was generated, closed with eos
        stats, prefill = _interrupt(child, "more")
        assert "interrupted" in stats[3]
        assert (int(prefill[1]), int(prefill[2])) == (len(encode_next_turn(tok, [USER("more")])), filled)
        _exit(child)


def test_eof_exits(checkpoint):
    path, _ = checkpoint
    with _chat(path) as child:
        child.expect_exact("> ")
        _exit(child, eof=True)


@pytest.mark.parametrize("flag,value", [("--top-p", "0"), ("--top-p", "1.5"), ("--temperature", "-1"),
                                        ("--temperature", "nan")])
def test_bad_flags_are_one_line(checkpoint, capsys, flag, value):
    from llama_jax.__main__ import main
    path, _ = checkpoint
    assert main(["chat", "--checkpoint", path, flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}: ") and len(err.splitlines()) == 1
