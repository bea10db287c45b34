"""The benchmark scripts' documented CPU smoke commands still run and report sane figures.

The GPU figures in benchmarks/RESULTS.md come from these scripts; a script that rots
between GPU sessions would leave those figures unreproducible. Each runs as a subprocess,
as the README shows, on the test session's 8 virtual CPU devices (so the train step runs
FSDP over a mesh, as the 7B benchmark does).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from llama_jax import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, args: list[str], out: Path) -> dict:
    env = {**os.environ, "OUT": str(out), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, f"benchmarks/{script}.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / f"{script}.json").read_text())


def test_train_step_smoke(tmp_path):
    res = _run("train_step", ["--shapes", "tiny", "--no-peer", "--steps", "2", "--seq", "128", "--batch", "2",
                              "--param-dtypes", "float32,bfloat16"], tmp_path)
    assert res["device"] == "cpu"
    ln_vocab = math.log(ModelConfig.preset("tiny").vocab_size)
    for key, dtype in (("tiny", "float32"), ("tiny_bfloat16", "bfloat16")):
        run = res[key]
        assert run["param_dtype"] == dtype and run["devices"] == 8
        assert run["fuse_gate_up"] and run["layer_loop"] == "unrolled"  # the benchmark's defaults
        assert run["step_s"] > 0 and run["tokens_per_s"] > 0
        # Two steps from a 0.02-scale random init: still the uniform-prediction loss, ln V.
        assert abs(run["loss"] - ln_vocab) < 0.05, (key, run["loss"], ln_vocab)


def test_train_step_fp8_smoke(tmp_path):
    res = _run("train_step", ["--shapes", "tiny", "--no-peer", "--steps", "2", "--seq", "128", "--batch", "2",
                              "--precision", "bf16,fp8", "--fp8-scaling", "current,delayed"], tmp_path)
    ln_vocab = math.log(ModelConfig.preset("tiny").vocab_size)
    for key, precision in (("tiny", "bf16"), ("tiny_fp8", "fp8"), ("tiny_fp8_delayed", "fp8")):
        run = res[key]
        assert run["matmul_precision"] == precision and run["devices"] == 8
        assert run.get("fp8_scaling") == {"tiny": None, "tiny_fp8": "current", "tiny_fp8_delayed": "delayed"}[key]
        assert run["step_s"] > 0 and run["tokens_per_s"] > 0 and run["tflops_per_device"] >= 0
        assert abs(run["loss"] - ln_vocab) < 0.05, (key, run["loss"], ln_vocab)
    # Same data, same init: FP8's first losses within a few of its roundings of bf16's.
    assert res["tiny_fp8"]["loss"] != res["tiny"]["loss"]
    assert abs(res["tiny_fp8"]["loss"] - res["tiny"]["loss"]) < 0.01 * ln_vocab
    # Delayed scaling (scales from the previous steps' amaxes): within a few roundings of current.
    assert res["tiny_fp8_delayed"]["fp8_history"] == 16
    assert abs(res["tiny_fp8_delayed"]["loss"] - res["tiny_fp8"]["loss"]) < 0.01 * ln_vocab


def test_fp8_quality_smoke(tmp_path):
    res = _run("fp8_quality", ["--shape", "tiny", "--steps", "10", "--batch", "8", "--seq", "64", "--warmup", "2",
                               "--log-every", "2", "--runs", "bf16,fp8,fp8_e4m3"], tmp_path)
    assert [s for s, _ in res["curves"]["bf16"]] == [s for s, _ in res["curves"]["fp8"]] == [2, 4, 6, 8, 10]
    e4m3 = res["compared"]["fp8_e4m3"]  # gradients in e4m3: another FP8 run, as close to bf16
    assert [r["fp8_e4m3"] for r in e4m3["table"]] != [r["fp8"] for r in res["table"]]
    assert e4m3["max_abs_rel_diff_after_warmup"] < 0.01 and e4m3["table_loss_mean"][0]["step"] == 4
    means = res["compared"]["fp8"]["table_loss_mean"]  # train.py's mean over the steps since the last log
    assert [r["step"] for r in means] == [4, 6, 8, 10] and all(r["fp8"] != dict(res["curves"]["fp8"])[r["step"]]
                                                             for r in means)
    assert [r["step"] for r in res["table"]] == [4, 6, 8, 10]  # after warmup
    for r in res["table"]:  # the same data and init: close, but not the same run twice
        assert r["bf16"] != r["fp8"] and abs(r["rel_diff"]) < 0.01
        assert r["rel_diff"] == r["fp8"] / r["bf16"] - 1
    assert (tmp_path / "fp8_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "fp8_quality_runs").exists()  # workdirs removed


def test_decode_smoke(tmp_path):
    res = _run("decode", ["--preset", "tiny", "--cpu-smoke", "--no-peer", "--batches", "1,4",
                          "--new-tokens", "16"], tmp_path)
    rows = {r["run"]: r for r in res["table"]}
    for name, batch in (("jax_b1", 1), ("jax_split_b1", 1), ("jax_b4", 4), ("jax_split_b4", 4)):
        row = rows[name]
        assert row["batch"] == batch and row["tokens_per_s"] > 0
        assert row["ms_per_step"] > 0 and 0 < row["roofline_share"]
    assert rows["hf_static_b1"]["error"] == "not run"  # --no-peer


def test_fp8_gemm_smoke(tmp_path):
    res = _run("fp8_gemm", ["--cpu-smoke"], tmp_path)
    assert res["device"] == "cpu" and [r["gemm"] for r in res["rows"]] == ["qkvo", "w1w3", "w2", "output"]
    for r in res["rows"]:
        assert r["bf16_us"] > 0 and r["fp8_us"] > 0 and r["fp8_fwd_bwd_us"] > 0
        # FP8's expected error (tests/test_fp8.py): ~0.038 forward, ~0.059 with e5m2 gradients.
        assert r["fp8_err_y"] < 0.05 and r["fp8_err_dx"] < 0.07 and r["fp8_err_dw"] < 0.07
        assert r["fp8_e4m3g_err_dx"] < 0.045 and r["fp8_e4m3g_err_dw"] < 0.045  # e4m3: ~0.038
        # The delayed-scaling history is seeded with this step's amaxes: current scaling's numbers.
        assert r["fp8_delayed_err_dw"] == r["fp8_err_dw"] and r["fp8_delayed_fwd_bwd_us"] > 0
        assert r["bf16_err_y"] < 0.01
    assert all(res[f"layer_matmul_ms_per_step_{k}"] > 0 for k in ("bf16", "fp8", "fp8_e4m3g", "fp8_delayed"))


def test_lora_step_smoke(tmp_path):
    res = _run("lora_step", ["--cpu-smoke"], tmp_path)
    assert res["device"] == "cpu"
    lora, sft = res["lora_tiny"], res["sft_tiny"]
    assert lora["tokens_per_s"] > 0 and sft["tokens_per_s"] > 0
    assert 0 < lora["trainable"] < sft["trainable"] / 10  # adapters only
    ln_vocab = math.log(ModelConfig.preset("tiny").vocab_size)
    assert abs(lora["loss"] - ln_vocab) < 0.05 and abs(sft["loss"] - ln_vocab) < 0.05
    assert lora["remat"] == "attention" and "error" not in sft  # (the SFT run is a subprocess)
    assert all(r["apart_ms"] > 0 and r["fused_ms"] > 0 for r in res["fusion_tiny"].values())


def test_packed_step_smoke(tmp_path):
    res = _run("packed_step", ["--cpu-smoke"], tmp_path)
    assert res["device"] == "cpu" and res["packed_kernel"] is False  # CPUs: the XLA path throughout
    assert res["rows"]["documents_per_row_max"] > 1 and res["rows"]["all_rows_fit"]
    ln_vocab = math.log(ModelConfig.preset("tiny").vocab_size)
    for key in ("unpacked", "packed_dense_mask", "packed_cudnn_thd"):
        run = res[key]
        assert run["tokens_per_s"] > 0 and run["ratio_to_unpacked"] > 0, (key, run)
        assert abs(run["loss"] - ln_vocab) < 0.05, (key, run["loss"])
    # The two packed variants train the same rows: on CPUs both are the XLA kernel, same loss.
    assert res["packed_dense_mask"]["loss"] == res["packed_cudnn_thd"]["loss"]
    t = res["train_py"]
    assert t["window_steps"] == [4] and t["tokens_per_s"] > 0 and t["step_s"] > 0, t


def test_fp8_and_packed_help_give_the_docstring_and_defaults():
    for script, shown in (("fp8_quality", ["(default: 500)", "(default: 0)", "fp8_delayed"]),
                          ("packed_step", ["(default: 2048)", "(default: 10)", "--cpu-smoke"])):
        out = subprocess.run([sys.executable, f"benchmarks/{script}.py", "--help"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60).stdout
        doc = open(os.path.join(ROOT, "benchmarks", f"{script}.py")).read().split('"""')[1]
        assert doc.splitlines()[0] in out and all(s in out for s in shown), out
        assert "(default: )" not in out and "(default: False)" not in out


def test_fp8_quality_table_names_the_logging_interval():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import fp8_quality
    row = {"step": 4, "bf16": 6.0, "fp8": 6.06, "rel_diff": 0.01}
    compared = {"fp8": {"table": [row], "table_loss_mean": [row], "max_abs_rel_diff_after_warmup": 0.01,
                        "max_abs_rel_diff_loss_mean": 0.01, "mean_rel_diff": 0.01}}
    lines = fp8_quality.table_lines(compared, "bf16", log_every=2)
    assert "| 2-step means" in lines[0] and lines[-1].endswith("1.000% of 2-step means, mean 1.000% (goal: 1%)")
    assert not any("10-step" in line for line in lines)


def test_fp8_cast_smoke(tmp_path):
    res = _run("fp8_cast", ["--cpu-smoke"], tmp_path)
    assert [r["name"] for r in res["rows"]] == ["w_qkv", "w_o", "w_w1w3", "w_w2", "g_qkv", "g_o", "g_w1w3", "g_w2"]
    for r in res["rows"]:
        assert r["t32w4_exact"] is True and r["xla_us"] > 0 and r["t32w4_us"] > 0
