"""Every CLI answers bad input with one line `error: ...` and exit status 2, never a traceback
(issue 18.9). The bad inputs live here, per CLI; each CLI's list runs in one fresh process
(this file run as a script calls each `main` through `run_cli`, as `__main__` does), plus one
real command line per CLI for the `__main__` wiring.
"""
import io
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"to_orbax": "convert/to_orbax.py", "from_orbax": "convert/from_orbax.py", "eval": "eval.py",
           "train": "train.py", "pretokenize": "pretokenize.py", "train_tokenizer": "train_tokenizer.py",
           "generate": "llama_jax/cli/generate.py"}


def bad_inputs(d: dict) -> dict[str, list[list[str]]]:
    """{cli: [argv, ...]} over the fixture folders in `d` (see `fixtures`)."""
    hf, meta, ck, out, tok = d["hf"], d["meta"], d["ckpt"], d["out"], d["tok"]
    to = ["--source", "hf", "--output", out]
    h = lambda name: ["--source", "hf", "--input", d[name], "--output", out]  # noqa: E731
    m = lambda name: ["--source", "meta", "--input", d[name], "--output", out]  # noqa: E731
    fo = ["--target", "hf", "--input", ck]
    ev = ["--checkpoint", ck, "--output", d["out"] + ".json"]
    tr = ["--config", "configs/tiny.py", "--workdir", d["workdir"]]
    gen = ["--checkpoint", ck, "--prompt", "hi"]
    return {
        "to_orbax": [
            [], ["--source", "xx", "--input", hf, "--output", out], to + ["--input", d["missing"]],
            to + ["--input", d["file"]], to + ["--input", d["empty"]], h("hf_badjson"), h("hf_strsize"),
            h("hf_mistral"), h("hf_gelu"), h("hf_window"), h("hf_qwen"), h("hf_nokey"), h("hf_truncated"),
            h("hf_garbage"), h("hf_escape"), h("hf_absolute"), h("hf_badindex"), h("hf_overlap"),
            h("hf_negative"), h("hf_int"), to + ["--input", hf, "--dtype", "int8"], h("hf_listconfig"),
            ["--source", "hf", "--input", hf, "--output", d["existing"]], m("meta_badjson"), m("meta_strdim"),
            m("meta_streps"), m("meta_noshard"), m("meta_garbage"), m("meta_list"), m("empty"),
            to + ["--inptu", hf], ["--source", "meta", "--input", hf, "--output", out],
        ],
        "from_orbax": [
            fo + ["--output", out, "--shards", "0"], fo + ["--output", out, "--shards", "-1"],
            fo + ["--output", out, "--shards", "abc"], fo + ["--output", out, "--max-shard-size", "abc"],
            fo + ["--output", out, "--max-shard-size", "0"], fo + ["--output", out, "--dtype", "int8"],
            ["--target", "xx", "--input", ck, "--output", out], ["--target", "hf", "--input", d["missing"],
                                                                 "--output", out],
            ["--target", "hf", "--input", d["empty"], "--output", out],
            ["--target", "hf", "--input", d["ck_badjson"], "--output", out],
            ["--target", "hf", "--input", d["ck_strdim"], "--output", out],
            ["--target", "meta", "--input", ck, "--output", out, "--shards", "3"],
            fo + ["--output", d["existing"]], fo, ["--target", "hf", "--input", d["file"], "--output", out],
        ],
        "eval": [
            ev, ev + ["--perplexity", "stdlib", "--limit", "0"], ev + ["--perplexity", "stdlib", "--limit", "-1"],
            ev + ["--perplexity", "stdlib", "--dtype", "int8"], ev + ["--perplexity", "stdlib", "--max-length", "0"],
            ev + ["--perplexity", "stdlib", "--max-length", "100000"],
            ev + ["--perplexity", f"text:{d['missing']}"], ev + ["--perplexity", f"lines:{d['empty_file']}"],
            ["--checkpoint", ck, "--perplexity", "stdlib", "--output", d["missing"] + "/x/r.json"],
            ev + ["--tasks", "nope"], ev + ["--perplexity", "stdlib", "--stride", "0"],
            ev + ["--perplexity", "bogus:spec"], ["--checkpoint", d["missing"], "--perplexity", "stdlib",
                                                  "--output", out + ".json"],
            ev + ["--perplexity", "stdlib", "--tokens-per-batch", "0"], ev + ["--tasks", "piqa", "--data-dir",
                                                                               d["empty"], "--tfds-data-dir", d["empty"]],
            ev + ["--perplexity", "stdlib", "--num-fewshot", "-1"], ev + ["--perplexity", "stdlib",
                                                                          "--tokenizer", d["file"]],
        ],
        "train": [tr + [a] for a in (
            "--config.stepz=3", "--config.checkpoint_every=0", "--config.log_every=0", "--config.data.shards=-1",
            "--config.steps=abc", "--config.optimizer.peak_lr=nan", "--config.model.dim=-3",
            "--config.keep_checkpoints=0", "--config.micro_batches=3", "--config.batch_size=0", "--bogus=1",
            "--config.model.n_heads=3", "--config.seq_len=0", "--config.eval_batches=-1",
            "--config.run.dtype=int8", "--config.optimizer.warmup_steps=-1", "--config.sample.temperature=-1",
            "--config.model.norm_eps=0", "--config.modle.dim=8", "--config.optimizer.peak_lr=inf",
            f"--config.data.sources=text:{d['missing']}", "--config.eval_data.sources=bogus:x")] + [
            ["--workdir", d["workdir"]], ["--config", "configs/tiny.py"], ["--config", d["missing"] + ".py",
                                                                            "--workdir", d["workdir"]],
            ["--config", d["syntax_config"], "--workdir", d["workdir"]],
            ["--config", d["noget_config"], "--workdir", d["workdir"]],
        ],
        "pretokenize": [
            ["--source", "text", "--path", d["missing"], "--tokenizer", tok, "--output", out],
            ["--tokenizer", d["missing"], "--output", out], ["--tokenizer", d["file"], "--output", out],
            ["--tokenizer", tok, "--output", out, "--docs-per-shard", "0"], ["--source", "xx", "--tokenizer", tok,
                                                                             "--output", out],
            ["--source", "jsonl", "--path", d["bad_jsonl"], "--tokenizer", tok, "--output", out],
            ["--tokenizer", tok], ["--source", "jsonl", "--path", d["jsonl"], "--field", "nope",
                                   "--tokenizer", tok, "--output", out],
            ["--source", "txt:notes.txt", "--tokenizer", tok, "--output", out],
            ["--source", f"text:{d['missing']}", "--tokenizer", tok, "--output", out],
            ["--source", f"pretokenized:{d['empty']}", "--tokenizer", tok, "--output", out],
        ],
        "train_tokenizer": [
            ["--vocab-size", "0", "--output", out], ["--vocab-size", "-5", "--output", out],
            ["--vocab-size", "abc", "--output", out], ["--source", "text", "--path", d["missing"],
                                                       "--vocab-size", "300", "--output", out],
            ["--vocab-size", "300", "--output", out, "--max-chars", "0"],
            ["--source", "jsonl", "--path", d["jsonl"], "--field", "nope", "--vocab-size", "300", "--output", out],
            ["--source", "text", "--path", d["empty_file"], "--vocab-size", "300", "--output", out],
            ["--vocab_size", "300"],
            ["--source", f"text:{d['missing']}", "--vocab-size", "300", "--output", out],
            ["--source", f"text:{d['empty_file']}", "--path", d["empty_file"], "--vocab-size", "300", "--output", out],
        ],
        "generate": [gen + a for a in (
            ["--max-new-tokens", "0"], ["--top-p", "2"], ["--top-p", "0"], ["--temperature", "-1"],
            ["--temperature", "nan"], ["--top-k", "0"], ["--tokenizer", d["missing"]], ["--dtype", "int8"],
            ["--tensor-parallel", "-1"], ["--max-new-tokens", "100000"], ["--top-k", "100000"],
            ["--tokenizer", d["file"]], ["--max-new-tokns", "3"])] + [
            ["--checkpoint", d["missing"], "--prompt", "hi"], ["--checkpoint", d["empty"], "--prompt", "hi"],
            ["--checkpoint", d["ck_badjson"], "--prompt", "hi"], ["--checkpoint", ck],
        ],
    }


# ------------------------------------------------------------------ fixtures: damaged copies of good files

def _edit_json(src, dst, fn, name):
    shutil.copytree(src, dst)
    path = os.path.join(dst, name)
    obj = json.load(open(path))
    obj = fn(obj)
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))
    return dst


def _edit_header(src, dst, fn):
    """A copy of an HF folder whose model.safetensors header is edited by fn(header)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = fn(json.loads(raw[8:8 + n]))
    blob = json.dumps(header).encode()
    blob += b" " * (n - len(blob)) if len(blob) <= n else b""
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    return dst


def _first_weight(h):
    return sorted(k for k in h if k != "__metadata__")[0]


def _last_weight(h):
    return max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def _hf_variants(hf, t, d):
    def index_to(target):
        def make(dst):
            shutil.copytree(hf, dst)
            os.rename(os.path.join(dst, "model.safetensors"), os.path.join(dst, "model-00001-of-00001.safetensors"))
            from llama_jax.interop.safetensors_files import SafetensorsFile
            keys = SafetensorsFile(os.path.join(dst, "model-00001-of-00001.safetensors")).keys()
            wm = {k: "model-00001-of-00001.safetensors" for k in keys}
            wm[sorted(keys)[0]] = target
            json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(dst, "model.safetensors.index.json"), "w"))
            return dst
        return make

    cfg = lambda fn: lambda dst: _edit_json(hf, dst, fn, "config.json")  # noqa: E731
    hdr = lambda fn: lambda dst: _edit_header(hf, dst, fn)  # noqa: E731
    variants = {
        "hf_badjson": cfg(lambda c: json.dumps(c)[:-5]), "hf_strsize": cfg(lambda c: {**c, "hidden_size": "64"}),
        "hf_mistral": cfg(lambda c: {**c, "model_type": "mistral", "sliding_window": 4096}),
        "hf_gelu": cfg(lambda c: {**c, "hidden_act": "gelu"}),
        "hf_window": cfg(lambda c: {**c, "sliding_window": 4096}),
        "hf_qwen": cfg(lambda c: {**c, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}),
        "hf_nokey": cfg(lambda c: {k: v for k, v in c.items() if k != "num_hidden_layers"}),
        "hf_listconfig": cfg(lambda c: [c]),
        "hf_overlap": hdr(lambda h: {**h, _last_weight(h): {**h[_last_weight(h)], "data_offsets": [
            h[_last_weight(h)]["data_offsets"][0] - 4, h[_last_weight(h)]["data_offsets"][1] - 4]}}),
        "hf_negative": hdr(lambda h: {**h, _first_weight(h): {**h[_first_weight(h)], "data_offsets": [
            -64, h[_first_weight(h)]["data_offsets"][1] - h[_first_weight(h)]["data_offsets"][0] - 64]}}),
        "hf_int": hdr(lambda h: {**h, _first_weight(h): {**h[_first_weight(h)], "dtype": "I32"}}),
        "hf_escape": index_to("../outside.safetensors"), "hf_absolute": index_to(os.path.join(t, "abs.safetensors")),
    }
    for name, make in variants.items():
        d[name] = make(os.path.join(t, name))
    shutil.copy(os.path.join(hf, "model.safetensors"), os.path.join(t, "abs.safetensors"))
    shutil.copy(os.path.join(hf, "model.safetensors"), os.path.join(t, "outside.safetensors"))
    for name, data in (("hf_truncated", None), ("hf_garbage", os.urandom(4096))):
        shutil.copytree(hf, os.path.join(t, name))
        path = os.path.join(t, name, "model.safetensors")
        if data is None:
            os.truncate(path, os.path.getsize(path) // 2)
        else:
            open(path, "wb").write(data)
        d[name] = os.path.join(t, name)
    d["hf_badindex"] = os.path.join(t, "hf_badindex")
    shutil.copytree(hf, d["hf_badindex"])
    open(os.path.join(d["hf_badindex"], "model.safetensors.index.json"), "w").write("{not json")


def _meta_variants(meta, t, d):
    pj = lambda fn: lambda dst: _edit_json(meta, dst, fn, "params.json")  # noqa: E731
    for name, make in {"meta_badjson": pj(lambda p: json.dumps(p)[:-3]), "meta_strdim": pj(lambda p: {**p, "dim": "64"}),
                       "meta_streps": pj(lambda p: {**p, "norm_eps": "1e-5"}), "meta_list": pj(lambda p: [p])}.items():
        d[name] = make(os.path.join(t, name))
    for name in ("meta_noshard", "meta_garbage"):
        shutil.copytree(meta, os.path.join(t, name))
        shard = os.path.join(t, name, "consolidated.00.pth")
        os.remove(shard) if name == "meta_noshard" else open(shard, "wb").write(os.urandom(2048))
        d[name] = os.path.join(t, name)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    import flax.linen as nn
    import jax
    import numpy as np
    from llama_jax import Llama, ModelConfig
    from llama_jax.interop import convert as conversion
    from llama_jax.checkpoint import save_params
    from llama_jax.data import train_tokenizer
    t = str(tmp_path_factory.mktemp("bad"))
    d = {"out": os.path.join(t, "out"), "missing": os.path.join(t, "missing"), "workdir": os.path.join(t, "w")}
    cfg = ModelConfig.preset("tiny")
    params = nn.unbox(Llama(cfg).init(jax.random.PRNGKey(0), np.ones((1, 8), np.int32))["params"])
    d["ckpt"] = os.path.join(t, "ckpt")
    text = ["def f(x):\n    return x + 1\n" * 20, "import os\nprint(os.getcwd())\n" * 20] * 10
    d["tok"] = os.path.join(t, "tok.model")
    train_tokenizer(text, 300, d["tok"])
    save_params(d["ckpt"], params, cfg)
    shutil.copy(d["tok"], os.path.join(d["ckpt"], "tokenizer.model"))
    d["hf"], d["meta"] = os.path.join(t, "hf"), os.path.join(t, "meta")
    conversion.from_orbax("hf", d["ckpt"], d["hf"])
    conversion.from_orbax("meta", d["ckpt"], d["meta"])
    for name in ("empty", "existing"):
        os.makedirs(os.path.join(t, name))
        d[name] = os.path.join(t, name)
    open(os.path.join(d["existing"], "keep"), "w").write("x")
    d["file"] = os.path.join(t, "file.txt")
    open(d["file"], "w").write("not a checkpoint\n")
    d["empty_file"] = os.path.join(t, "empty.txt")
    open(d["empty_file"], "w").close()
    d["jsonl"] = os.path.join(t, "docs.jsonl")
    open(d["jsonl"], "w").write('{"text": "hello"}\n{"text": "world"}\n')
    d["bad_jsonl"] = os.path.join(t, "bad.jsonl")
    open(d["bad_jsonl"], "w").write('{"text": "hello"}\n{"text": \n')
    d["syntax_config"] = os.path.join(t, "syntax.py")
    open(d["syntax_config"], "w").write("def get_config(:\n    pass\n")
    d["noget_config"] = os.path.join(t, "noget.py")
    open(d["noget_config"], "w").write("x = 1\n")
    for name, dump in (("ck_badjson", lambda c: json.dumps(c)[:-4]), ("ck_strdim", lambda c: {**c, "dim": "64"})):
        d[name] = _edit_json(d["ckpt"], os.path.join(t, name), dump, "model_config.json")
    _hf_variants(d["hf"], t, d)
    _meta_variants(d["meta"], t, d)
    return d


TALLY = {}


@pytest.mark.parametrize("cli", sorted(SCRIPTS))
def test_bad_inputs_give_one_line(cli, fixtures, tmp_path):
    argvs = bad_inputs(fixtures)[cli]
    (tmp_path / "argvs.json").write_text(json.dumps(argvs))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user has
    p = subprocess.run([sys.executable, os.path.abspath(__file__), cli, str(tmp_path / "argvs.json")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(p.stdout.strip().splitlines()[-1])
    bad = []
    for r in rows:
        lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error: ")]
        ok = r["rc"] == 2 and len(errors) == 1 and "Traceback" not in r["stderr"]
        if not ok:
            bad.append((r["argv"], r["rc"], r["stderr"][-600:]))
    for r in rows:  # shown with -s: the messages themselves, for a reader to judge
        print(f"{cli} {' '.join(a[-40:] for a in r['argv'])}\n    {r['stderr'].strip()[-300:]}")
    TALLY[cli] = (len(rows), len(rows) - len(bad), sum(r["rc"] == "traceback" for r in rows))
    print(f"\n{cli}: tried {len(rows)}, one-line {len(rows) - len(bad)}, tracebacks {TALLY[cli][2]}")
    assert not bad, "\n\n".join(f"{a} -> rc {rc}\n{e}" for a, rc, e in bad)


@pytest.mark.parametrize("cli", sorted(SCRIPTS))
def test_main_wiring_one_line(cli, tmp_path):
    """The real command line: `python SCRIPT --bogus-flag` exits 2 with one error line."""
    cmd = [sys.executable, "-m", "llama_jax", "generate"] if cli == "generate" else [sys.executable, SCRIPTS[cli]]
    p = subprocess.run(cmd + ["--bogus-flag"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr


def test_source_flag_takes_a_spec_or_a_bare_kind(tmp_path):
    """pretokenize.py / train_tokenizer.py: `--source text:F` is `--source text --path F` (README's form)."""
    import argparse
    from llama_jax.cli.sources import add_source_flags, source_from_flags
    (tmp_path / "a.txt").write_text("hello")
    p = argparse.ArgumentParser()
    add_source_flags(p)
    flags = lambda *a: source_from_flags(p.parse_args(list(a)))  # noqa: E731
    f = str(tmp_path / "a.txt")
    assert flags("--source", f"text:{f}") == flags("--source", "text", "--path", f)
    assert flags("--source", f"lines:{f}") == flags("--source", "text", "--path", f, "--text-unit", "line")
    assert flags("--source", f"jsonl:{f}#body") == flags("--source", "jsonl", "--path", f, "--field", "body")
    assert flags("--source", "stdlib") == flags("--source", "stdlib:train")


# ------------------------------------------------------------------ the driver (a fresh process)

def _main_of(cli: str):
    import runpy
    if cli == "generate":
        from llama_jax.cli.generate import main
        return main
    return runpy.run_path(os.path.join(ROOT, SCRIPTS[cli]), run_name="cli_under_test")["main"]


def drive(cli: str, argvs: list[list[str]]) -> list[dict]:
    """Run each argv through run_cli(main) in this process; what each printed and returned."""
    from llama_jax.errors import run_cli
    main, rows = _main_of(cli), []
    for argv in argvs:
        err, out = io.StringIO(), io.StringIO()
        old = sys.stderr, sys.stdout
        sys.stderr, sys.stdout = err, out
        try:
            rc = run_cli(main, argv)
        except SystemExit as e:
            rc = e.code
        except BaseException as e:  # noqa: BLE001 - what escapes run_cli is a traceback
            import traceback
            rc, _ = "traceback", traceback.print_exc(file=err)
        finally:
            sys.stderr, sys.stdout = old
        rows.append({"argv": argv, "rc": rc, "stderr": err.getvalue()})
    return rows


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    cli, argvs = sys.argv[1], json.load(open(sys.argv[2]))
    os.chdir(ROOT)
    print(json.dumps(drive(cli, argvs)))
