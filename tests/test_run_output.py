"""Training on your own data from the command line, and what a run leaves behind: the
source-spec syntax (train.py and eval.py share one parser), one-line errors for bad specs,
phase lines outside the progress bar, the start-of-run summary, config.json, cumulative
tokens, the sample file and TensorBoard text, rounded final numbers, the plot."""
import glob
import json
import math
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from llama_jax.train import plot

from llama_jax.train import report as run_report
from llama_jax.data import SourceConfig, SourceKind, TextUnit
from llama_jax.data.spec import parse_source, parse_sources, to_spec
from llama_jax.errors import InputError
from train_helpers import REPO

WORD = "zebraquokka"  # a word only the test corpus has: the tokenizer must learn it


def test_spec_kinds_weights_globs_and_default_splits():
    got = parse_sources("0.7*text:notes/*.txt, 0.3*jsonl:chat.jsonl#body,lines:a.txt,pretokenized:tok/,"
                        "tfds:c4/en,tfds:wikipedia/20230601.en:validation,stdlib,stdlib:eval")
    assert got == (
        SourceConfig(kind=SourceKind.TEXT, path="notes/*.txt", weight=0.7),  # the glob's "*" is not a weight
        SourceConfig(kind=SourceKind.JSONL, path="chat.jsonl", field="body", weight=0.3),
        SourceConfig(kind=SourceKind.TEXT, path="a.txt", text_unit=TextUnit.LINE),
        SourceConfig(kind=SourceKind.PRETOKENIZED, path="tok/"),
        SourceConfig(kind=SourceKind.TFDS, name="c4/en", split="train"),
        SourceConfig(kind=SourceKind.TFDS, name="wikipedia/20230601.en", split="validation"),
        SourceConfig(kind=SourceKind.STDLIB, split="train"),
        SourceConfig(kind=SourceKind.STDLIB, split="eval"))
    assert parse_sources("stdlib,tfds:lm1b", "validation") == (
        SourceConfig(kind=SourceKind.STDLIB, split="eval"), SourceConfig(kind=SourceKind.TFDS, name="lm1b",
                                                                          split="validation"))
    assert parse_sources(",".join(to_spec(s, with_weight=True) for s in got)) == got


def test_eval_perplexity_uses_the_same_parser():
    from llama_jax.evaluation import parse_source as eval_parse
    assert eval_parse("tfds:lm1b", "/data") == parse_source("tfds:lm1b", "test", "/data") == SourceConfig(
        kind=SourceKind.TFDS, name="lm1b", split="test", data_dir="/data")
    assert eval_parse("jsonl:x.jsonl") == SourceConfig(kind=SourceKind.JSONL, path="x.jsonl")
    with pytest.raises(InputError, match="perplexity source: give one source"):
        eval_parse("text:a,text:b")


@pytest.mark.parametrize("spec, message", [
    ("bogus:x", "unknown source kind 'bogus'"), ("text:", "text: needs a PATH"), ("tfds", "tfds: needs a NAME"),
    ("two*text:a", "weight 'two' is not a number"), ("0*text:a", "a weight must be > 0"),
    ("text:a,,text:b", "empty source"), ("", "empty source")])
def test_bad_specs_say_what_is_wrong_in_one_line(spec, message):
    with pytest.raises(InputError) as e:
        parse_sources(spec, where="--config.data.sources")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("--config.data.sources: ")


def _env():
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
                PYTHONPATH=REPO)


def _train(cwd, *flags, timeout=300):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", os.path.join(REPO, "configs", "tiny.py"),
           "--workdir", "run", *flags]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("flag, message", [
    ("--config.data.sources=text:no_such_file.txt",
     "error: --config.data.sources: text:no_such_file.txt: no such file"),
    ("--config.eval_data.sources=0.5*jsonl", "error: --config.eval_data.sources: jsonl: needs a PATH")])
def test_train_py_rejects_a_bad_spec_in_one_line(tmp_path, flag, message):
    p = _train(tmp_path, flag, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().startswith(message) and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not os.path.exists(tmp_path / "run")


def _corpus(path):
    # Real prose-like text (the stdlib's json package) with a word no other corpus has.
    import sysconfig
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")))
    lines = [line for f in files for line in open(f).read().splitlines()]
    path.write_text("\n".join(f"{WORD} {line}" for line in lines))


def test_train_on_a_local_text_file_given_on_the_command_line(tmp_path):
    _corpus(tmp_path / "corpus.txt")
    (tmp_path / "held_out.txt").write_text("".join(f"{WORD} line {i} of the held-out text\n" for i in range(50)))
    steps, batch, seq = 4, 4, 32
    p = _train(tmp_path, "--config.data.sources=text:corpus.txt", "--config.eval_data.sources", "lines:held_out.txt",
               f"--config.steps={steps}", "--config.optimizer.warmup_steps=2", "--config.log_every=2",
               "--config.eval_every=0", "--config.eval_batches=1", f"--config.batch_size={batch}",
               f"--config.seq_len={seq}", "--config.sample.max_new_tokens=8")
    assert p.returncode == 0, p.stdout + p.stderr
    run = tmp_path / "run"

    # The run read the given files: the config records them, the tokenizer learnt their word.
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["sources"] == [{"kind": "text", "path": str(tmp_path / "corpus.txt"), "name": "",
                                       "split": "train", "field": "text", "text_unit": "file", "weight": 1.0,
                                       "messages_field": "messages", "prompt_field": "prompt",
                                       "completion_field": "completion", "loss_mask": "assistant"}]
    assert cfg["eval_data"]["sources"][0]["text_unit"] == "line"
    assert cfg["model"]["dim"] == 64 and cfg["steps"] == steps
    assert cfg["data"]["tokenizer"] == str(run / "tokenizer.model")
    from llama_jax.data import load_tokenizer
    tok = load_tokenizer(str(run / "tokenizer.model"))
    assert len(tok.encode(WORD, bos=False)) == 1, tok.encode(WORD, bos=False)  # ~10 pieces when unseen

    # Phases and the summary print as whole lines, before the bar; no absl-formatted line.
    err = p.stderr
    for phase in ("training a 512-piece tokenizer on ['text:", "initialising the parameters",
                  "run: fresh start (seed 0); steps 0 -> 4", f"tokens per step: {batch} x {seq} = {batch * seq}",
                  "mesh data 1 x fsdp 1 x tensor 1", f"data: text:{tmp_path / 'corpus.txt'}; eval: lines:",
                  f"checkpoints in {run / 'checkpoints'}", "compiling the train step", "generating a 8-token sample"):
        assert phase in err, err
    assert err.index("compiling the train step") < err.index("step/s"), err
    assert not any(line[:1] == "I" and line[1:5].isdigit() for line in err.splitlines()), err  # absl INFO

    # metrics.jsonl: `tokens` counts every token trained so far; `loss_tokens` this step's.
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["tokens"]) for r in rows] == [(2, 2 * batch * seq), (4, 4 * batch * seq)]
    assert all(0 < r["loss_tokens"] <= batch * seq for r in rows)

    # Final lines: rounded numbers, the sample as a file and as TensorBoard text, the plot.
    out = p.stdout
    final = out.splitlines()[0]
    tail = run_report.train_loss_tail(rows, steps)
    assert final == (f"step {steps}: eval loss {rows[-1]['eval_loss']:.4g}, train loss {tail[0]:.4g} "
                     f"(mean of steps 3-4)"), out
    sample = (run / "samples" / f"step_{steps}.txt").read_text()
    assert sample.startswith("def ") and sample.rstrip("\n") in out
    events = glob.glob(str(run / "tensorboard" / "*.sample"))
    assert len(events) == 1 and b"sample" in open(events[0], "rb").read()
    assert _png_size(run / "plot.png") == (plot.WIDTH, plot.HEIGHT)

    # The same command again: one line that the run is complete, nothing compiled or written.
    before = sorted(os.listdir(run / "checkpoints")), (run / "metrics.jsonl").read_text()
    again = _train(tmp_path, *p.args[6:], timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.strip() == (f"run: the run is already complete (checkpoint at step {steps} of {steps}); "
                                    f"raise --config.steps to continue"), again.stdout
    assert "compiling" not in again.stderr, again.stderr
    assert (sorted(os.listdir(run / "checkpoints")), (run / "metrics.jsonl").read_text()) == before


def _png_pixels(path) -> np.ndarray:
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, i = {}, 8
    while i < len(data):
        (n,), kind = struct.unpack(">I", data[i:i + 4]), data[i + 4:i + 8]
        body, crc = data[i + 8:i + 8 + n], struct.unpack(">I", data[i + 8 + n:i + 12 + n])[0]
        assert zlib.crc32(kind + body) == crc, kind
        chunks[kind] = body
        i += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + 3 * w)
    assert not raw[:, 0].any()  # filter type 0 on every row
    return raw[:, 1:].reshape(h, w, 3)


def _png_size(path):
    img = _png_pixels(path)
    return img.shape[1], img.shape[0]


def test_plot_draws_each_curve_where_its_values_are(tmp_path):
    # Train loss falls from 6 to 3; the eval loss is logged every 25 steps; lr warms up then decays.
    rows = [{"step": s, "loss_mean": 6 - 3 * s / 100, "lr": 1e-3 * min(1, s / 10) * math.cos(s / 70),
             **({"eval_loss": 5.5 - 2 * s / 100} if s % 25 == 0 else {})} for s in range(5, 101, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')
    from llama_jax.cli.plot import main as plot_main
    assert plot_main([str(tmp_path)]) == 0
    img = _png_pixels(tmp_path / "plot.png")

    def where(name):
        ys, xs = np.nonzero((img == plot.COLORS[name]).all(-1))
        return ys, xs

    ys, xs = where("train loss")
    left, right = ys[xs < plot.WIDTH * 0.3].mean(), ys[(xs > plot.WIDTH * 0.7) & (xs < plot.WIDTH - 200)].mean()
    assert left < right - 100  # a falling loss: high on the left (small row index), low on the right
    assert len(where("eval loss")[0]) > 100
    lr_ys, _ = where("lr")
    assert lr_ys.min() > plot.TOP + (plot.HEIGHT - plot.TOP - plot.GAP - plot.BOTTOM) * 2 // 3  # the lower panel


def test_plot_of_a_run_without_metrics_is_one_line(tmp_path):
    with pytest.raises(InputError, match="metrics.jsonl: no logged steps to plot"):
        plot.plot_run(str(tmp_path))


def test_final_train_loss_averages_the_last_tenth_of_the_steps_weighted_by_steps():
    rows = [{"step": s, "loss_mean": float(s)} for s in range(10, 101, 10)]
    assert run_report.train_loss_tail(rows, 100) == (100.0, 91)
    rows = [{"step": 880, "loss_mean": 9.0}, {"step": 900, "loss_mean": 1.0}, {"step": 950, "loss_mean": 2.0},
            {"step": 1000, "loss_mean": 4.0}]  # an eval-forced log at 950 splits the window unevenly
    assert run_report.train_loss_tail(rows, 1000) == ((50 * 2.0 + 50 * 4.0) / 100, 901)


def test_plot_names_a_missing_workdir(tmp_path, capsys):
    from llama_jax.errors import run_cli
    from llama_jax.cli.plot import main as plot_main
    assert run_cli(plot_main, [str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such directory" in err and "metrics.jsonl" not in err
