"""Data: sources (TFDS, local files, the stdlib corpus), tokenizer, packing, resumable input.

Entry points:
  DataConfig(sources=(SourceConfig(...), ...), shuffle, num_epochs, read_threads, prefetch_buffer)
      `DataConfig.from_dict(d)` takes a dict / ml_collections ConfigDict. Source kinds:
      stdlib (default; the Python standard library's .py files, split "train"/"eval"),
      text / jsonl (file, directory or glob; `field` for JSONL), tfds (`name`, `split`,
      `data_dir`; read with tfds.data_source, tfds.load fallback when TensorFlow exists),
      pretokenized (a `pretokenize` output directory), and for fine-tuning chat_jsonl
      (`messages_field`, `loss_mask`: LossMask.ASSISTANT | LAST_ASSISTANT) and
      prompt_completion (`prompt_field`, `completion_field`): see `llama_jax.data.sft`.
      `weight` mixes sources per document.
  Tokenizer(model_path)            .encode(text, bos=True, eos=False), .decode(ids),
                                   .bos_id, .eos_id, .pad_id (-1), .vocab_size
  Llama3Tokenizer(model_path)      the same interface over LLaMA 3's tiktoken BPE file
                                   (bos n_ranks = 128000, eos 128001, .eot_id 128009)
  load_tokenizer(path)             Tokenizer or Llama3Tokenizer, picked from the file
  train_tokenizer(texts_or_source, vocab_size, output_path) -> Tokenizer   (LLaMA recipe)
  check_vocab(tokenizer, model_vocab_size)     DataError if the tokenizer is too large
  make_dataset(data_config, tokenizer, seq_len, global_batch_size, seed=0,
               shard_index=None, shard_count=None) -> DataIterator
      next(it) -> {"tokens", "targets", "segment_ids", "positions", "loss_mask"}, numpy
      [global_batch_size // shard_count, seq_len]; it.get_state() / it.set_state(state)
      (small JSON-serialisable dict, save it in the checkpoint); it.stats.
  make_global_batch(local_batch, sharding) -> dict of global jax.Arrays
  pretokenize(source, tokenizer, output_dir) -> metadata dict
The batch contract and the packing rule are documented in `llama_jax.data.packing`.
All failures the user must fix raise `DataError` (a ValueError) naming the file or key.
"""
from llama_jax.data.config import DataConfig, DataError, LossMask, SourceConfig, SourceKind, TextUnit, paper_mixture
from llama_jax.data.packing import BATCH_KEYS, PipelineStats, pack_documents
from llama_jax.data.pipeline import DataIterator, make_dataset, make_global_batch
from llama_jax.data.pretokenize import pretokenize
from llama_jax.data.pretokenized_source import PretokenizedSource
from llama_jax.data.tokenizer import Tokenizer, check_vocab
from llama_jax.data.tokenizer_training import train_tokenizer
from llama_jax.data.tiktoken_tokenizer import Llama3Tokenizer, load_tokenizer

__all__ = [
    "BATCH_KEYS", "DataConfig", "DataError", "DataIterator", "Llama3Tokenizer", "LossMask", "PipelineStats",
    "PretokenizedSource",
    "SourceConfig", "SourceKind", "TextUnit", "Tokenizer", "check_vocab", "load_tokenizer", "make_dataset",
    "make_global_batch", "pack_documents", "paper_mixture", "pretokenize", "train_tokenizer",
]
