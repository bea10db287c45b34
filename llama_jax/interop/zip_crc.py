"""Set the CRC-32 of stored (uncompressed) records of a zip archive after their bytes were
written in place.

`torch_io.TorchFileWriter` lays out a `.pth` archive with `torch.save` before the tensor
bytes exist, so the archive's CRC-32 fields describe the placeholder, not the data. The
writer computes each record's CRC-32 while it writes the bytes, and this module puts the
values where zip readers look (APPNOTE.TXT 4.3.7, 4.3.9, 4.3.12):
- the central directory header (CRC at byte 16): what Python's `zipfile` checks;
- the data descriptor after the data, when the record has one (general purpose flag bit 3;
  optional signature `PK\\x07\\x08`, then the CRC);
- the local file header (CRC at byte 14), unless flag bit 3 says it holds zero by design.
Records are named by the file offset of their first data byte, the number torch reports
as a storage's `_checkpoint_offset`, so nothing here depends on torch's record names.
"""
from __future__ import annotations

import os
import struct
import zipfile

_LOCAL = struct.Struct("<IHHHHHIIIHH")         # local file header, 30 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory header, 46 bytes
_DESCRIPTOR_SIG = b"PK\x07\x08"
_HAS_DESCRIPTOR = 0x08


def _pread(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise ValueError(f"zip record at byte {offset}: file ends early")
    return data


def set_crc32(path: str | os.PathLike, crcs: dict[int, int]) -> None:
    """Write `crcs` ({data offset: CRC-32}) into the records of the zip at `path` whose
    data starts at those offsets; every offset must name a record."""
    path = str(path)
    with zipfile.ZipFile(path) as z:
        infos, central_start = z.infolist(), z.start_dir
    fd = os.open(path, os.O_RDWR)
    try:
        pos, patched = central_start, set()
        for info in infos:
            header = _CENTRAL.unpack(_pread(fd, _CENTRAL.size, pos))
            if header[0] != 0x02014B50:
                raise ValueError(f"{path}: no zip central directory header at byte {pos}")
            name_len, extra_len, comment_len = header[10:13]
            local = _LOCAL.unpack(_pread(fd, _LOCAL.size, info.header_offset))
            data_start = info.header_offset + _LOCAL.size + local[9] + local[10]
            if data_start in crcs:
                crc = struct.pack("<I", crcs[data_start])
                os.pwrite(fd, crc, pos + 16)
                if info.flag_bits & _HAS_DESCRIPTOR:
                    end = data_start + info.compress_size
                    signed = _pread(fd, 4, end) == _DESCRIPTOR_SIG
                    os.pwrite(fd, crc, end + (4 if signed else 0))
                else:
                    os.pwrite(fd, crc, info.header_offset + 14)
                patched.add(data_start)
            pos += _CENTRAL.size + name_len + extra_len + comment_len
    finally:
        os.close(fd)
    missing = sorted(set(crcs) - patched)
    if missing:
        raise ValueError(f"{path}: no zip record has its data at byte(s) {missing[:8]}")
