"""Tokenizer, incremental detokenizer and stop checks, plus a deterministic tokenizer writer.

Text goes through the `tokenizers` library's tokenizer.json directly. That is the object
transformers' fast tokenizers wrap, so ids and decoded text are identical to
`AutoTokenizer.from_pretrained(dir)`, without importing transformers at run time (seconds).
The few behaviours transformers layers on top (named special tokens missing from tokenizer.json,
chat templates) are mirrored here. Whether BOS/EOS are added is the tokenizer.json post-processor's
call alone: transformers 5 ignores tokenizer_config's add_bos_token / add_eos_token when a
tokenizer.json exists, and so do we.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from klotski.errors import KlotskiError

if TYPE_CHECKING:  # only for annotations: importing sampling pulls in torch (~2 s)
    from klotski.outputs import FinishReason
    from klotski.sampling import SamplingParams

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object, or {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise KlotskiError(f"{path} is not valid JSON ({e}): restore it from the original checkpoint") from e


def _token_str(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a plain string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _id_set(value: int | list[int] | None) -> set[int]:
    """generation_config's token id field (an int, a list, or absent) as a set."""
    if value is None:
        return set()
    return {int(value)} if isinstance(value, int) else {int(v) for v in value}


def _pick_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja if present, else tokenizer_config's template ("default" of a named list)."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default")
    return template


class Tokenizer:
    """Text <-> token ids for one checkpoint, matching transformers' fast tokenizer."""

    def __init__(
        self, backend: HFTokenizer, config: dict[str, Any], generation_config: dict[str, Any], chat_template: str | None
    ) -> None:
        self._tok = backend
        self._config = config
        self.special_tokens = {k: _token_str(config.get(k)) for k in _SPECIAL_KEYS}
        self.chat_template = chat_template
        self._add_missing_special_tokens()
        self.bos_token_id = self._first_id(generation_config.get("bos_token_id"), "bos_token")
        self.pad_token_id = self._first_id(generation_config.get("pad_token_id"), "pad_token")
        eos = _id_set(generation_config.get("eos_token_id"))
        eos |= _id_set(self._id_of(self.special_tokens["eos_token"]))
        self.eos_token_ids: frozenset[int] = frozenset(eos)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and generation_config.json from a checkpoint."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise KlotskiError(
                f"{tokenizer_file} not found: copy the model's tokenizer.json into {directory}, "
                "or drive the checkpoint with prompt_token_ids instead of text prompts "
                "(a checkpoint without a tokenizer still generates token ids)"
            )
        config = _read_json(directory / "tokenizer_config.json")
        try:
            backend = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises a bare Exception for a bad file
            raise KlotskiError(
                f"{tokenizer_file} cannot be read ({e}): restore it from the original checkpoint"
            ) from None
        return cls(
            backend, config, _read_json(directory / "generation_config.json"), _pick_chat_template(directory, config)
        )

    @property
    def backend(self) -> HFTokenizer:
        """The `tokenizers` library's tokenizer (tokenizer.json as loaded, special tokens added)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' len(tokenizer))."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str | None:
        """The EOS token's text, or None."""
        return self.special_tokens["eos_token"]

    @property
    def bos_token(self) -> str | None:
        """The BOS token's text, or None."""
        return self.special_tokens["bos_token"]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; add_special_tokens adds BOS/EOS as the checkpoint's post-processor says."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ids, as transformers' decode gives it."""
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self._config.get("clean_up_tokenization_spaces") and not self._is_bpe():
            text = _clean_up_tokenization(text)
        return text

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render a chat with the checkpoint's Jinja template, as transformers does (tokenize=False)."""
        if self.chat_template is None:
            raise KlotskiError(
                "this checkpoint has no chat template (tokenizer_config.json 'chat_template' or "
                "chat_template.jinja): send plain text prompts, or add a template to the checkpoint"
            )
        import jinja2

        specials = {k: v for k, v in self.special_tokens.items() if v is not None}
        try:
            template = _jinja_env().from_string(self.chat_template)
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None, **specials
            )
        except jinja2.TemplateError as e:  # raise_exception() in the template, or a broken template
            raise KlotskiError(f"chat template: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a rendered chat; the template writes BOS itself, so none is added (as vLLM)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def _is_bpe(self) -> bool:
        """True for BPE models, where transformers skips its space clean-up."""
        return isinstance(self._tok.model, models.BPE)

    def _id_of(self, token: str | None) -> int | None:
        """The id of a token string, or None if absent."""
        return None if token is None else self._tok.token_to_id(token)

    def _first_id(self, generation_value: int | list[int] | None, key: str) -> int | None:
        """generation_config's id (first if a list), else the id of tokenizer_config's token."""
        ids = generation_value if isinstance(generation_value, list) else [generation_value]
        if ids and ids[0] is not None:
            return int(ids[0])
        return self._id_of(self.special_tokens[key])

    def _add_missing_special_tokens(self) -> None:
        """Add named special tokens that tokenizer.json lacks as added tokens, as transformers does."""
        present = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        for entry in (self._config.get("added_tokens_decoder") or {}).values():
            if entry["content"] not in present:
                self._tok.add_tokens(
                    [
                        AddedToken(
                            entry["content"],
                            single_word=entry.get("single_word", False),
                            lstrip=entry.get("lstrip", False),
                            rstrip=entry.get("rstrip", False),
                            normalized=entry.get("normalized", True),
                            special=entry.get("special", False),
                        )
                    ]
                )
                present.add(entry["content"])
        missing = [t for t in self.special_tokens.values() if t is not None and t not in present]
        if missing:
            self._tok.add_special_tokens(missing)


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: drop spaces before punctuation and contractions."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


def _jinja_env():
    """A sandboxed Jinja environment with the helpers transformers gives chat templates."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        # Jinja's own tojson escapes HTML characters, which would change the prompt text.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def collect_eos_ids(
    directory: str | Path, config_ids: Sequence[int] = (), tokenizer: Tokenizer | None = None
) -> frozenset[int]:
    """Every id that ends a sequence: config.json's (`config_ids`), generation_config.json's and the
    tokenizer's EOS token (the tokenizer already read generation_config.json when there is one)."""
    if tokenizer is not None:
        return frozenset(config_ids) | tokenizer.eos_token_ids
    generation = _read_json(Path(directory) / "generation_config.json")
    return frozenset(config_ids) | frozenset(_id_set(generation.get("eos_token_id")))


class IncrementalDecoder:
    """Detokenizes one sequence a token at a time (the `tokenizers` library's DecodeStream), holding
    back byte pieces of an incomplete UTF-8 character until it completes."""

    # Prompt tokens decoded as left context, so the first generated token keeps its leading space.
    CONTEXT_TOKENS = 5

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._context = list(prompt_token_ids)[-self.CONTEXT_TOKENS :]  # ids before the held-back ones
        self._stream = decoders.DecodeStream(ids=self._context, skip_special_tokens=skip_special_tokens)
        self._held: list[int] = []  # ids fed whose text is not complete yet
        self.text = ""

    def add(self, token_id: int) -> str:
        """Feed one token; return the newly complete text (may be "")."""
        delta = self._stream.step(self._tokenizer.backend, token_id)
        if delta is None:
            self._held.append(token_id)
            return ""
        self._advance(token_id)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emit whatever is held back (incomplete UTF-8 shows as U+FFFD), at sequence end."""
        if not self._held:
            return ""
        prefix = self._tokenizer.decode(self._context, self._skip)
        delta = self._tokenizer.decode(self._context + self._held, self._skip)[len(prefix) :]
        self._advance()
        self.text += delta
        return delta

    def _advance(self, *emitted: int) -> None:
        self._context = (self._context + self._held + list(emitted))[-self.CONTEXT_TOKENS :]
        self._held = []


def find_stop_string(text: str, new_chars: int, stop: Sequence[str], include_in_output: bool) -> tuple[str, int] | None:
    """vLLM's stop-string search over the last new_chars of text: (stop string, cut index or -1)."""
    if not new_chars or not stop:
        return None
    for stop_str in stop:
        # Start far enough back that a stop string straddling earlier text is still found.
        index = text.find(stop_str, 1 - new_chars - len(stop_str))
        if index == -1:
            continue
        if include_in_output:
            index += len(stop_str)
            if index >= len(text):
                return stop_str, -1
        return stop_str, index
    return None


@dataclass(slots=True)
class StopState:
    """Where a sequence stands after its latest token."""

    finished: bool
    finish_reason: FinishReason | None
    stop_reason: str | int | None
    text: str


class StopChecker:
    """One sequence's generated ids, text and vLLM stop rules (EOS, stop ids, stop strings, length)."""

    def __init__(
        self,
        params: SamplingParams,
        eos_token_ids: frozenset[int],
        tokenizer: Tokenizer | None = None,
        prompt_token_ids: Sequence[int] = (),
    ) -> None:
        if params.stop and tokenizer is None:
            raise KlotskiError(
                "stop strings need a tokenizer: use stop_token_ids, or add the model's tokenizer.json to the checkpoint"
            )
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.token_ids: list[int] = []
        self._decoder = (
            IncrementalDecoder(tokenizer, prompt_token_ids, params.skip_special_tokens)
            if tokenizer is not None
            else None
        )
        self.text = ""

    def append(self, token_id: int) -> StopState:
        """Record one generated token and say whether the sequence is done."""
        self.token_ids.append(token_id)
        reason, stop_reason = self._token_stop(token_id)
        # As vLLM: a stopping token's own text is left out unless include_stop_str_in_output.
        decode_it = reason != "stop" or self.params.include_stop_str_in_output
        new_chars = self._detokenize(token_id if decode_it else None, final=reason is not None)
        if self.params.stop and len(self.token_ids) > self.params.min_tokens:
            hit = find_stop_string(self.text, new_chars, self.params.stop, self.params.include_stop_str_in_output)
            if hit is not None:
                stop_reason, cut = hit
                reason, self.text = "stop", self.text if cut == -1 else self.text[:cut]
        return StopState(reason is not None, reason, stop_reason, self.text)

    def _token_stop(self, token_id: int) -> tuple[FinishReason | None, int | None]:
        """vLLM's token-level check: length first, then min_tokens, EOS, stop_token_ids."""
        count, p = len(self.token_ids), self.params
        if count >= p.max_tokens:
            return "length", None
        if count < p.min_tokens:
            return None, None
        if not p.ignore_eos and token_id in self.eos_token_ids:
            return "stop", None
        if token_id in p.stop_token_ids:
            return "stop", token_id
        return None, None

    def _detokenize(self, token_id: int | None, final: bool) -> int:
        """Feed the decoder; flush it at the end so text covers every token. Returns new chars."""
        if self._decoder is None:
            return 0
        delta = self._decoder.add(token_id) if token_id is not None else ""
        if final:
            delta += self._decoder.flush()
        self.text += delta
        return len(delta)


# A few paragraphs of plain English for write_tokenizer's BPE: small, fixed, and ours to ship.
_CORPUS = """\
The river ran low that summer, and the old mill stood quiet for the first time in forty years.
Children walked along the dry stones, looking for coins and bottles the water had hidden.
Their parents said the rain would come back in the autumn, as it always had before.

A mixture of experts model keeps many small networks and asks a router which ones to use.
Each token visits only two or three experts, so most of the weights sit idle at any moment.
When the model is larger than the memory of the device, the idle experts can wait on the host
or on a disk, and the engine fetches them just before they are needed.

The library opened at nine in the morning and closed at six in the evening, except on Sundays.
Visitors could borrow up to twelve books at once, and return them within three weeks.
She asked the librarian where the maps were kept; he pointed to the shelves near the window.

Numbers matter: 1, 2, 3, 10, 42, 100, 2025, 3.14 and 0.5 appear in tables, prices and dates.
Questions end with a question mark? Exclamations end with a mark of their own! Lists use commas,
semicolons; colons: and quotes, "like these", or 'these', (and brackets) [of] {every} <kind>.

We measured the time it took to read each file, then the time to compute each layer,
and planned the schedule so that the reading of the next layer hid behind the work of this one.
Good plans are simple to explain, easy to test, and honest about what they cannot do.
"""

_RESERVED = "<|reserved_{}|>"
_MIN_VOCAB = 300

# Mistral-style template: plain-text markers, so it needs no extra special tokens.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Unknown role ' + message['role']"
    " + ': use system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
)


def _train_bpe(vocab_size: int, specials: list[str]) -> HFTokenizer:
    """A byte-level BPE of at most vocab_size ids trained on the built-in corpus (deterministic)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    return tok


def write_tokenizer(
    out_dir: str | Path,
    vocab_size: int,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json with exactly vocab_size ids; return special ids."""
    if vocab_size < _MIN_VOCAB:
        raise KlotskiError(
            f"vocab_size={vocab_size} is too small for a byte-level tokenizer "
            f"(256 bytes + specials): use vocab_size >= {_MIN_VOCAB}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_bpe(vocab_size, [bos_token, eos_token, "<unk>"])
    # Reserved tokens fill the rest, so every id a random-weight model samples decodes.
    first = tok.get_vocab_size()
    tok.add_tokens([AddedToken(_RESERVED.format(i), normalized=False) for i in range(first, vocab_size)])
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos_token,
        "eos_token": eos_token,
        "unk_token": "<unk>",
        "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return {
        "bos_token_id": tok.token_to_id(bos_token),
        "eos_token_id": tok.token_to_id(eos_token),
        "unk_token_id": tok.token_to_id("<unk>"),
    }
