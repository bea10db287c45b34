"""Crafted safetensors headers and index files are refused with one line naming the file (issue 18.6).

Each bad file is built from a good one by editing the header: the reader must never build
weights from header bytes, from another tensor's bytes, or from files outside the model folder.
"""
import json
import os
import shutil
import struct

import numpy as np
import pytest

from llama_jax.errors import InputError
from llama_jax.interop.safetensors_files import SafetensorsFile, SafetensorsWriter
from llama_jax.interop.sources import HFSource


def _write(path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


def _good_header():
    return {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}


def test_good_file_reads(tmp_path):
    data = np.arange(8, dtype=np.float32).tobytes()
    _write(tmp_path / "x.safetensors", _good_header(), data)
    f = SafetensorsFile(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(f.read("b"), [4, 5, 6, 7])


BAD = {
    "negative begin": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, "bad data_offsets"),
    "end before begin": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [16, 8]}}, "bad data_offsets"),
    "overlap": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                 "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, "overlap tensor a"),
    "same bytes twice": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                          "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "overlap"),
    "past the end": ({"a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}}, "truncated"),
    "size != dtype x shape": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}},
                              r"does not match shape \(3,\) F32 \(expected 12, got 16\)"),
    "float offsets": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}}, "bad data_offsets"),
    "negative dim": ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, "bad shape"),
    "unknown dtype": ({"a": {"dtype": "F8_E9", "shape": [4], "data_offsets": [0, 16]}}, "unsupported dtype"),
    "missing key": ({"a": {"dtype": "F32", "shape": [4]}}, "malformed header entry"),
    "not an object": ([1, 2, 3], "not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_header_refused(tmp_path, case):
    header, pattern = BAD[case]
    _write(tmp_path / "x.safetensors", header, np.zeros(8, np.float32).tobytes())
    with pytest.raises(InputError, match=pattern) as e:
        SafetensorsFile(tmp_path / "x.safetensors")
    assert str(e.value).startswith(str(tmp_path / "x.safetensors")) and "\n" not in str(e.value)


def test_insane_header_length_and_bad_json(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(InputError, match="header length in bytes is not sane"):
        SafetensorsFile(p)
    p.write_bytes(struct.pack("<Q", 4) + b"{no}")
    with pytest.raises(InputError, match="header is not valid JSON"):
        SafetensorsFile(p)
    p.write_bytes(struct.pack("<Q", 2) + b"\xff\xfe")
    with pytest.raises(InputError, match="header is not valid JSON"):
        SafetensorsFile(p)


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory):
    from test_convert_common import tiny_model, write_hf
    import torch
    d = tmp_path_factory.mktemp("hf") / "model"
    write_hf(tiny_model("gqa"), str(d), torch.float32, kind="sharded")
    assert (d / "model.safetensors.index.json").is_file()
    return d


def _with_index_entry(hf_sharded, tmp_path, target: str):
    """A copy of the model whose index sends one tensor to `target`."""
    d = tmp_path / "model"
    shutil.copytree(hf_sharded, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = sorted(index["weight_map"])[0]
    index["weight_map"][name] = target
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def test_index_shard_paths_confined(hf_sharded, tmp_path):
    HFSource(hf_sharded)  # the untouched model opens
    outside = tmp_path / "outside"
    outside.mkdir()
    first = sorted(p.name for p in hf_sharded.glob("*.safetensors"))[0]
    shutil.copy(hf_sharded / first, outside / first)
    for target, pattern in ((f"../outside/{first}", "leaves the model folder"),
                            (str(outside / first), "leaves the model folder")):
        d = _with_index_entry(hf_sharded, tmp_path, target)
        with pytest.raises(InputError, match=pattern):
            HFSource(d)
        shutil.rmtree(d)
    d = _with_index_entry(hf_sharded, tmp_path, "link.safetensors")
    os.symlink(outside / first, d / "link.safetensors")
    with pytest.raises(InputError, match="leads out of the model folder"):
        HFSource(d)


def test_integer_weights_refused(tmp_path):
    from test_convert_common import tiny_model, write_hf
    import torch
    d = tmp_path / "model"
    write_hf(tiny_model("gqa"), str(d), torch.float32, kind="single")
    f = SafetensorsFile(d / "model.safetensors")
    specs = {n: (f.shape(n), np.dtype(np.int32) if n.endswith("q_proj.weight") else f.dtype(n)) for n in f.keys()}
    arrays = {n: f.read(n).astype(specs[n][1]) for n in f.keys()}
    os.remove(d / "model.safetensors")
    w = SafetensorsWriter(d / "model.safetensors", specs)
    for n, a in arrays.items():
        w.write(n, a)
    w.close()
    with pytest.raises(InputError, match=r"q_proj\.weight: integer or bool dtype for a float weight"):
        HFSource(d)


def test_config_json_not_json_names_file(hf_sharded, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(hf_sharded, d)
    (d / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(InputError, match=r"config\.json: not valid JSON"):
        HFSource(d)
