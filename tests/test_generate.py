"""generate() against transformers' greedy generate, stopping, bucketing, sharding, bad input."""
import jax
import numpy as np
import pytest
import torch

from hf_utils import hf_model, params_from_hf
from llama_jax import ModelConfig, generate
from llama_jax.inference.generate import bucket_cache, bucket_pow2
from llama_jax.inference.decode import prepare

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=256)
LENGTHS = (5, 13, 30)
NEW = 48


@pytest.fixture(scope="module")
def setup():
    model = hf_model(CFG, seed=0)
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(3, CFG.vocab_size, n - 1).tolist() for n in LENGTHS]
    return model, params_from_hf(model, CFG), prompts


def _hf_greedy(model, prompts, new):
    """transformers' greedy generate on a left-padded batch with an attention mask."""
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[:, width:].numpy()


def test_greedy_matches_transformers(setup):
    model, params, prompts = setup
    ours = generate(CFG, params, prompts, NEW, stop_ids=())
    theirs = _hf_greedy(model, prompts, NEW)
    assert [len(r) for r in ours] == [NEW] * len(prompts)
    np.testing.assert_array_equal(np.array(ours), theirs)
    # A row alone gives the same tokens as in the batch (padding does not leak).
    assert generate(CFG, params, [prompts[0]], NEW, stop_ids=())[0] == ours[0]


def test_stops_at_and_includes_stop_id(setup):
    _, params, prompts = setup
    free = generate(CFG, params, prompts, 24, stop_ids=())
    stop = free[0][9]
    stopped = generate(CFG, params, prompts, 24, stop_ids=[stop])
    for row, full in zip(stopped, free):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]
    assert stopped[0][-1] == stop and len(stopped[0]) <= 10


def test_bucketing_does_not_recompile(setup):
    _, params, prompts = setup
    compiles = []
    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        generate(CFG, params, [prompts[1][:9]], 10)  # bucket 16
        first = len(compiles)
        for n, new, seed in ((10, 10, 1), (16, 12, 2), (12, 7, 3)):  # same prompt bucket, cache bucket 64
            generate(CFG, params, [prompts[1][:n]], new, stop_ids=[5, 6], seed=seed)
        assert first >= 1 and len(compiles) == first, "a new prompt length within a bucket recompiled"
        generate(CFG, params, [prompts[2][:20]], 10)  # bucket 32: compiles once more
        assert len(compiles) > first
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_buckets():
    assert [bucket_pow2(n) for n in (1, 8, 9, 100)] == [8, 8, 16, 128]
    assert [bucket_cache(n) for n in (10, 65, 144, 200, 257)] == [64, 80, 160, 224, 320]


def test_tensor_parallel_mesh_gives_the_same_tokens(setup):
    from llama_jax import sharding
    _, params, prompts = setup
    mesh = sharding.make_mesh((1, 1, 2), devices=jax.devices()[:2])
    ref = generate(CFG, params, prompts, 12, stop_ids=())
    assert generate(CFG, params, prompts, 12, stop_ids=(), mesh=mesh) == ref
    assert generate(CFG, prepare(params), prompts, 12, stop_ids=(), mesh=mesh) == ref


def test_prepared_params_give_the_same_tokens(setup):
    _, params, prompts = setup
    weights = prepare(params)
    assert generate(CFG, weights, prompts, 12, stop_ids=()) == generate(CFG, params, prompts, 12, stop_ids=())
    with pytest.raises(ValueError, match="params do not match"):
        generate(CFG, weights._replace(layers=weights.layers[:1]), [[1, 2]], 4)


@pytest.mark.parametrize("prompts, new, match", [
    ([[]], 4, "empty"),
    ([], 4, "no prompts"),
    ([1, 2, 3], 4, "list of token-id lists"),
    ([[1, 2, 256]], 4, "outside the vocabulary"),
    ([[1, -3]], 4, "outside the vocabulary"),
    ([[1] * 250], 7, "exceed the context"),
    ([[1, 2]], 0, "max_new_tokens"),
])
def test_bad_prompts(setup, prompts, new, match):
    _, params, _ = setup
    with pytest.raises(ValueError, match=match):
        generate(CFG, params, prompts, new)


def test_bad_sampling_and_params(setup):
    _, params, _ = setup
    for kw, match in (({"top_p": 0.0}, "top_p"), ({"temperature": -1.0}, "temperature"),
                      ({"temperature": 1.0, "top_k": 0}, "top_k"), ({"stop_ids": [999]}, "stop_ids")):
        with pytest.raises(ValueError, match=match):
            generate(CFG, params, [[1, 2]], 4, **kw)
    with pytest.raises(ValueError, match="params do not match"):
        generate(CFG.replace(n_layers=3), params, [[1, 2]], 4)
