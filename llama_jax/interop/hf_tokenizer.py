"""The tokenizer and generation files of a Hugging Face export, built from our tokenizer.

`AutoTokenizer.from_pretrained(export)` must give the ids our tokenizer gives, so the
files describe our tokenizer's exact pipeline in the `tokenizers` library's terms
(tokenizer.json, loaded as is through `tokenizer_class: PreTrainedTokenizerFast`) rather
than naming a transformers class that rebuilds its own pipeline:
- SentencePiece (LLaMA 1/2): BPE over the whole text with byte fallback, after
  sentencepiece's normalization (one "▁" prepended, every space -> "▁": the "legacy"
  Llama pipeline; Metaspace's "first" scheme would not prepend to text that already
  starts with a space); merges ranked by the piece scores of the model.
- tiktoken (LLaMA 3): the cl100k split pattern, then byte-level BPE that takes a whole
  split piece when it is a token (tiktoken's rule: `ignore_merges`), merges ranked by
  the rank of the merged token; the 256 special tokens after the ranks, in our order.
Both prepend bos in a post-processor and never append eos (our prompts: bos only).
tokenizer_config.json carries the chat format of the tokenizer's family as `chat_template`
(data/chat_format.py: `apply_chat_template(dialog, add_generation_prompt=True)` gives
`encode_dialog`'s ids), always: a base model's users never call it, and Meta's own Llama 3.1
base repos carry one too. A template spells its control tokens as text, so the export keeps
transformers' default `split_special_tokens: false`, as Meta's own Hugging Face tokenizers
do: text that spells a special token (say "<|eot_id|>") becomes that token, where Meta's
and our `encode` keep it plain text; `tokenizer(text, split_special_tokens=True)` gives ours.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from llama_jax.checkpoint.layout import TOKENIZER_MODEL

if TYPE_CHECKING:  # the converters import this module: no tokenizer libraries until needed
    from llama_jax.config import ModelConfig
    from llama_jax.data import Llama3Tokenizer, Tokenizer

log = logging.getLogger(__name__)
_SPIECE_SPACE = "\u2581"


def _merges(vocab: dict[str, int], priority: dict[str, float]) -> list[tuple[str, str]]:
    """Every (left, right) split of a token into two tokens, best `priority` of the merged
    token first (how transformers' converters rank merges from a vocabulary)."""
    found = []
    for token in priority:
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in vocab and right in vocab:
                found.append((-priority[token], vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _bos_template(bos: str, bos_id: int):
    from tokenizers import processors
    return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                         special_tokens=[(bos, bos_id)])


def sentencepiece_tokenizer(tok: Tokenizer):
    """A `tokenizers.Tokenizer` that encodes and decodes as the SentencePiece BPE model `tok`
    (LLaMA's kind; a unigram model would need a Unigram model here)."""
    from tokenizers import AddedToken, decoders, normalizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE
    sp = tok._sp
    vocab = {sp.IdToPiece(i): i for i in range(sp.GetPieceSize())}
    special = [i for i in range(sp.GetPieceSize()) if sp.IsControl(i) or sp.IsUnknown(i)]
    mergeable = {sp.IdToPiece(i): sp.GetScore(i) for i in range(sp.GetPieceSize())
                 if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i))}
    hf = HFTokenizer(BPE(vocab, _merges(vocab, mergeable), unk_token=sp.IdToPiece(tok.unk_id),
                         fuse_unk=True, byte_fallback=True))
    hf.add_special_tokens([AddedToken(sp.IdToPiece(i), normalized=False, special=True) for i in special])
    hf.normalizer = normalizers.Sequence([normalizers.Prepend(_SPIECE_SPACE),
                                          normalizers.Replace(" ", _SPIECE_SPACE)])
    hf.decoder = decoders.Sequence([decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    hf.post_processor = _bos_template(sp.IdToPiece(tok.bos_id), tok.bos_id)
    return hf


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tiktoken_tokenizer(tok: Llama3Tokenizer):
    """A `tokenizers.Tokenizer` that encodes and decodes as the tiktoken tokenizer `tok`."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    from llama_jax.data.tiktoken_tokenizer import PAT_STR, parse_ranks
    byte_char = _bytes_to_unicode()
    ranks = parse_ranks(tok._bytes, tok.path)
    vocab = {"".join(byte_char[b] for b in token): rank for token, rank in ranks.items()}
    priority = {t: -r for t, r in vocab.items()}
    hf = HFTokenizer(BPE(vocab, _merges(vocab, priority), fuse_unk=False, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    names = sorted(tok.special_tokens, key=tok.special_tokens.get)
    hf.add_special_tokens([AddedToken(n, normalized=False, special=True) for n in names])
    moved = [n for n in names if hf.token_to_id(n) != tok.special_tokens[n]]
    if moved:  # added tokens take the ids after the vocabulary, in order: ours must be those
        raise ValueError(f"{tok.path}: special token {moved[0]} would get id {hf.token_to_id(moved[0])} "
                         f"in tokenizer.json, expected {tok.special_tokens[moved[0]]}")
    bos = names[tok.bos_id - tok.n_ranks]
    hf.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                             _bos_template(bos, tok.bos_id)])
    return hf


def _is_tiktoken(tok) -> bool:
    from llama_jax.data import Llama3Tokenizer
    return isinstance(tok, Llama3Tokenizer)


def _token_names(tok) -> dict[str, str]:
    if _is_tiktoken(tok):
        name = {i: n for n, i in tok.special_tokens.items()}
        return {"bos_token": name[tok.bos_id], "eos_token": name[tok.eos_id]}
    return {"bos_token": tok.id_to_piece(tok.bos_id), "eos_token": tok.id_to_piece(tok.eos_id),
            "unk_token": tok.id_to_piece(tok.unk_id)}


def write_tokenizer_files(tok: Tokenizer | Llama3Tokenizer, out_dir: str | Path, max_seq_len: int) -> list[str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for `tok` in `out_dir`."""
    try:
        hf = tiktoken_tokenizer(tok) if _is_tiktoken(tok) else sentencepiece_tokenizer(tok)
    except ImportError:
        raise ImportError("writing a Hugging Face tokenizer.json needs the `tokenizers` package "
                          "(pip install tokenizers, or transformers)") from None
    out = Path(out_dir)
    hf.save(str(out / "tokenizer.json"))
    names = _token_names(tok)
    from llama_jax.data.chat_format import hf_chat_template
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "add_bos_token": True, "add_eos_token": False,
              "split_special_tokens": False, "clean_up_tokenization_spaces": False,
              "model_max_length": max_seq_len, "model_input_names": ["input_ids", "attention_mask"],
              "chat_template": hf_chat_template(tok)}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2, ensure_ascii=False))
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def generation_ids(tok: Tokenizer | Llama3Tokenizer | None, generation) -> dict:
    """generation_config.json's token ids for a model of `generation` (generations.Generation)
    using `tok` (None: the generation's released tokenizer). Stop ids: the generation's
    (Llama 3: <|end_of_text|>, <|eot_id|>; 3.1 on also <|eom_id|>), at the same places after
    a tiktoken file's ranks; a SentencePiece file's eos. LLaMA has no pad token, so padding
    uses the first stop id, transformers' own fallback."""
    from llama_jax import generations
    meta = generations.special_ids(generation)
    if tok is None:
        bos, eos = meta.bos, list(meta.stop)
    elif _is_tiktoken(tok):
        if not generation.llama3_family:
            meta = generations.special_ids(generations.Generation.LLAMA3)
        bos, eos = tok.bos_id, [tok.bos_id + (s - meta.bos) for s in meta.stop]
    else:
        bos, eos = tok.bos_id, [tok.eos_id]
    return {"bos_token_id": bos, "eos_token_id": eos if len(eos) > 1 else eos[0], "pad_token_id": eos[0]}


def write_export_files(out_dir: str | Path, config: ModelConfig) -> list[str]:
    """generation_config.json, and the transformers tokenizer files for the tokenizer.model in
    `out_dir` unless it already has a tokenizer_config.json (files that came from Hugging Face);
    config.json's bos/eos set to that tokenizer's."""
    from llama_jax.data import DataError, load_tokenizer
    out, tok = Path(out_dir), None
    if (out / TOKENIZER_MODEL).is_file():
        try:
            tok = load_tokenizer(str(out / TOKENIZER_MODEL))
        except DataError as e:
            log.warning("no Hugging Face tokenizer files written: %s", e)
    written = []
    if tok is not None and not (out / "tokenizer_config.json").is_file():
        written = write_tokenizer_files(tok, out, config.max_seq_len)
    ids = generation_ids(tok, config.generation)
    if tok is not None and (out / "config.json").is_file():  # the tokenizer's ids, e.g. of a small test vocabulary
        hf = json.loads((out / "config.json").read_text())
        hf.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
        (out / "config.json").write_text(json.dumps(hf, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"_from_model_config": False, **ids}, indent=2))
    return written + ["generation_config.json"]
