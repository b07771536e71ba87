"""Prompt/response and chat records -> training documents with a loss mask (fine-tuning data).

Formats (``tools/preprocess_data.py --format``):

- ``text``: a document is its text (the default; no loss mask).
- ``prompt_response``: JSON lines with ``prompt`` and ``response`` strings. A document is
  ``[BOS] prompt response EOS``, prompt and response encoded separately (as inference sees a
  prompt: alone), BOS as the tokenizer frames documents; the loss applies to the response and
  its EOS.
- ``chat``: JSON lines with ``messages``, a list of ``{"role", "content"}``, rendered by the
  tokenizer's own chat template (a Hugging Face tokenizer directory with one). The loss applies
  to every assistant turn: the tokens that rendering ``messages[:i+1]`` adds to rendering
  ``messages[:i]`` with the generation prompt, i.e. exactly what the model generates after the
  prompt it sees at inference (the turn's content and its end-of-turn tokens). A template
  that does not render each conversation as an extension of its prefixes (one that rewrites
  earlier turns) is refused, naming the record. An EOS is appended (not learned) as the
  document separator unless the rendering already ends with it.

The mask is stored beside the tokens as its own Megatron indexed dataset, one uint8 per token
(1: the token is a target of the loss), same sequence lengths and documents:
``PREFIX.lossmask.bin`` / ``.idx`` next to ``PREFIX.bin`` / ``.idx`` (and for every shard and
the validation split). Megatron's readers read the tokens as before and ignore it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Optional

FORMATS = ("text", "prompt_response", "chat")
LOSS_MASK_SUFFIX = ".lossmask"


def loss_mask_prefix(prefix: str) -> str:
    """``PREFIX.lossmask``: the loss mask of the token file ``PREFIX``."""
    return prefix + LOSS_MASK_SUFFIX


@dataclass(frozen=True)
class RecordFormat:
    """How records become documents (picklable: it travels to the preprocessor's workers)."""

    kind: str = "text"
    """text | prompt_response | chat."""
    prompt_key: str = "prompt"
    response_key: str = "response"
    messages_key: str = "messages"
    tokenizer: str = ""
    """The tokenizer directory (chat: its template renders the messages)."""

    @property
    def masked(self) -> bool:
        return self.kind != "text"

    def required_key(self) -> str:
        """The JSON key every record of this format must have (checked on the first record)."""
        return {"prompt_response": self.prompt_key, "chat": self.messages_key}[self.kind]


class RecordError(ValueError):
    """A record that does not have the format's fields (counted as skipped: ``invalid_record``)."""


def parse_record(line, fmt: RecordFormat):
    """(prompt, response) or messages from one JSON line; RecordError if the fields are missing or
    not of the right type."""
    rec = json.loads(line)
    if not isinstance(rec, dict):
        raise RecordError("not a JSON object")
    if fmt.kind == "prompt_response":
        prompt, response = rec.get(fmt.prompt_key), rec.get(fmt.response_key)
        if not (isinstance(prompt, str) and isinstance(response, str) and response.strip()):
            raise RecordError(f"needs string '{fmt.prompt_key}' and non-empty '{fmt.response_key}'")
        return prompt, response
    messages = rec.get(fmt.messages_key)
    if not (isinstance(messages, list) and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
        raise RecordError(f"'{fmt.messages_key}' must be a list of {{'role', 'content'}} strings")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no assistant message: nothing to learn")
    if messages[0]["role"] == "assistant":
        raise RecordError("the conversation starts with an assistant message: there is no prompt")
    return messages


def prompt_response_documents(pairs: list, encode: Callable[[list[str]], list[list[int]]], bos: Optional[int],
                              eos: Optional[int]) -> list[tuple[list[int], list[int]]]:
    """[(ids, mask)] for (prompt, response) pairs: ``[BOS] prompt response [EOS]``, mask 1 on the
    response and its EOS. Prompts and responses are encoded in two batches."""
    prompts = encode([p for p, _ in pairs])
    responses = encode([r for _, r in pairs])
    head, tail = ([bos] if bos is not None else []), ([eos] if eos is not None else [])
    docs = []
    for p, r in zip(prompts, responses):
        ids = head + p + r + tail
        docs.append((ids, [0] * (len(head) + len(p)) + [1] * (len(r) + len(tail))))
    return docs


class ChatRenderer:
    """The tokenizer's chat template, as a (ids, mask) renderer of conversations."""

    def __init__(self, tokenizer_dir: str, eos: Optional[int]):
        from megasink.data.tokenizer import TokenizerError, auto_tokenizer, tokenizer_kind

        kind, path = tokenizer_kind(tokenizer_dir)
        if kind != "huggingface":
            raise TokenizerError(f"--format chat needs a Hugging Face tokenizer directory with a chat template; "
                                 f"{tokenizer_dir} is a sentencepiece model (use --format prompt_response)")
        self.tok = auto_tokenizer(path)
        if not getattr(self.tok, "chat_template", None):
            raise TokenizerError(f"{tokenizer_dir} has no chat template (tokenizer_config.json 'chat_template' or "
                                 "chat_template.jinja): --format chat renders messages with it; use --format "
                                 "prompt_response for plain pairs")
        self.eos = eos

    def _ids(self, messages: list, generation_prompt: bool = False) -> list[int]:
        return list(self.tok.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                 add_generation_prompt=generation_prompt))

    def __call__(self, messages: list) -> tuple[list[int], list[int]]:
        ids = self._ids(messages)
        mask = [0] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._ids(messages[:i], generation_prompt=True)
            upto = self._ids(messages[: i + 1])
            if upto[: len(prompt)] != prompt or ids[: len(upto)] != upto:
                raise RecordError(f"the chat template does not render message {i} as an extension of the "
                                  "messages before it (does it rewrite earlier turns?): no loss mask can be cut")
            mask[len(prompt):len(upto)] = [1] * (len(upto) - len(prompt))
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids, mask = ids + [self.eos], mask + [0]  # the document separator, not a target
        return ids, mask
