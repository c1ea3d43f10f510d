"""Prompts as users give them -> (text, token ids), checked against the model before anything runs.

A prompt is a string, {"prompt": str}, {"prompt_token_ids": [int, ...]} (with an optional
"prompt" beside it for the output), or a conversation rendered with the chat template. Every
entry point (LLM.generate, `klotski generate`, the server, run-batch) parses through here, so
they accept and reject the same inputs with the same messages.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from klotski.errors import KlotskiError, ParameterError
from klotski.sampling import is_utf8
from klotski.tokenizer import Tokenizer

Prompt = str | dict[str, Any]


class TokenizedPrompt(NamedTuple):
    """A parsed prompt: its text (None when given as ids only) and its token ids."""

    text: str | None
    token_ids: list[int]


class PromptParser:
    """Parses and checks prompts for one model: its tokenizer, vocabulary and context length."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, max_model_len: int, model: str = "the model"):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.model = model  # named in errors

    def parse(self, prompt: Prompt, where: str = "prompt") -> TokenizedPrompt:
        """(text, ids) of one prompt, checked: ids in the vocabulary, not empty, shorter than the context."""
        text, ids = self.tokenize(prompt, where)
        self.check_length(ids, where)
        return TokenizedPrompt(text, ids)

    def tokenize(self, prompt: Prompt, where: str = "prompt") -> TokenizedPrompt:
        """(text, ids) of a string, {"prompt": ...} or {"prompt_token_ids": [...]}; ids checked against the
        vocabulary."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    raise ParameterError(f"{where}: prompt_token_ids must be a list of integers")
                bad = [t for t in ids if not 0 <= t < self.vocab_size]
                if bad:
                    raise ParameterError(
                        f"{where}: token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
                    )
                return TokenizedPrompt(prompt.get("prompt"), list(ids))
            if "prompt" not in prompt:
                raise KlotskiError(f"{where}: a prompt dict needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if not isinstance(prompt, str):
            raise KlotskiError(f"{where}: a prompt must be a string or a dict, got {type(prompt).__name__}")
        if not is_utf8(prompt):
            raise ParameterError(f"{where}: the prompt is not valid UTF-8 text; re-encode it as UTF-8")
        if self.tokenizer is None:
            raise KlotskiError(
                f"{self.model} has no tokenizer.json: pass prompts as "
                "{'prompt_token_ids': [...]} or add the model's tokenizer files"
            )
        return TokenizedPrompt(prompt, self.tokenizer.encode(prompt))

    def check_length(self, ids: list[int], where: str = "prompt") -> None:
        """An empty prompt, or one that leaves no room to generate in the context, is an error."""
        if not ids:
            raise KlotskiError(f"{where}: the prompt is empty; give at least one token")
        if len(ids) >= self.max_model_len:
            raise KlotskiError(
                f"{where}: the prompt has {len(ids)} tokens but the model's context is "
                f"{self.max_model_len}; shorten the prompt"
            )

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> dict[str, Any]:
        """A conversation rendered with the chat template, as a prompt dict: {"prompt", "prompt_token_ids"}."""
        if self.tokenizer is None:
            raise KlotskiError(f"{self.model} has no tokenizer.json, so chat templates are unavailable")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise KlotskiError("messages must be a list of {'role': ..., 'content': ...} objects")
        for i, m in enumerate(messages):
            content = m.get("content")
            if isinstance(content, str) and not is_utf8(content):
                raise ParameterError(f"message {i}: the content is not valid UTF-8 text; re-encode it as UTF-8")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        # The template writes BOS itself where it wants one, so no special tokens are added again.
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    def record(self, record: dict[str, Any], where: str) -> TokenizedPrompt:
        """A JSONL-style record: {"messages": [...]} (chat), else a prompt dict; parsed and checked."""
        prompt = self.chat(record["messages"]) if "messages" in record else record
        return self.parse(prompt, where)
