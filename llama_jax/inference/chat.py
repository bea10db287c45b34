"""Chat with instruct models: the dialog formats (llama_jax.data.chat_format, where the
training data's chat sources use them too), re-exported here as the chat API."""
from llama_jax.data.chat_format import (ChatFamily, chat_family, encode_answer, encode_dialog, encode_next_turn,
                                        end_of_turn_ids, hf_chat_template)

__all__ = ["ChatFamily", "chat_family", "encode_answer", "encode_dialog", "encode_next_turn", "end_of_turn_ids",
           "hf_chat_template"]
