"""Bytes to text for the document sources: UTF-8, with undecodable bytes replaced and counted.

Its own module so that every source (files, TFDS) can use it without importing another
source's module.
"""
from __future__ import annotations

import logging
import threading

log = logging.getLogger("llama_jax.data.sources")  # the logger these warnings always had


class DecodeCounter:
    """Counts documents and replaced characters from bytes that are not UTF-8."""

    def __init__(self):
        self._lock = threading.Lock()
        self.documents = 0
        self.replaced = 0

    def decode(self, raw: bytes, where: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            n = text.count("\ufffd")
            with self._lock:
                self.documents += 1
                self.replaced += n
            log.warning("%s: %d undecodable byte sequence(s) replaced by U+FFFD", where, n)
            return text
