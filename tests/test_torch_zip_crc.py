"""The .pth files we write are valid zip archives: every record's CRC-32 matches its bytes
(Python's zipfile checks them; llama.cpp's converter reads .pth through zipfile)."""
import glob
import zipfile

import numpy as np
import torch

from test_convert_common import CASES, assert_same_tensors, read_meta, tiny_model, write_meta
from llama_jax.interop import convert as conversion
from llama_jax.interop.torch_files import TorchFileWriter


def test_meta_export_records_have_right_crc32(tmp_path):
    write_meta(tiny_model("gqa"), CASES["gqa"], str(tmp_path / "meta"), shards=2, dtype=torch.bfloat16)
    conversion.to_orbax("meta", tmp_path / "meta", tmp_path / "orbax")
    conversion.from_orbax("meta", tmp_path / "orbax", tmp_path / "back", shards=2)
    files = sorted(glob.glob(str(tmp_path / "back" / "consolidated.*.pth")))
    assert len(files) == 2
    for f in files:
        with zipfile.ZipFile(f) as z:
            assert len(z.infolist()) > 20  # the data records are checked, not only the pickle
            assert z.testzip() is None, f
    for a, b in zip(read_meta(str(tmp_path / "meta")), read_meta(str(tmp_path / "back"))):
        assert_same_tensors(a, b)


def test_writer_crc32_with_empty_strided_and_bfloat16_tensors(tmp_path):
    import ml_dtypes
    specs = {"a": ((3, 5), np.float32), "empty": ((0, 4), np.float16),
             "t": ((7, 3), np.dtype(ml_dtypes.bfloat16)), "i": ((6,), np.int64)}
    arrays = {"a": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32),
              "empty": np.zeros((0, 4), np.float16),
              "t": np.arange(21, dtype=np.float32).reshape(3, 7).T.astype(ml_dtypes.bfloat16),  # not contiguous
              "i": np.arange(6) * 7919}
    w = TorchFileWriter(tmp_path / "x.pth", specs)
    for name, arr in arrays.items():
        w.write(name, arr)
    w.close()
    with zipfile.ZipFile(tmp_path / "x.pth") as z:
        assert z.testzip() is None
    got = torch.load(tmp_path / "x.pth", weights_only=True)
    for name, arr in arrays.items():
        t = got[name].float() if name == "t" else got[name]
        np.testing.assert_array_equal(t.numpy(), np.asarray(arr, np.float32 if name == "t" else arr.dtype))
