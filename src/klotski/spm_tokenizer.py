"""A SentencePiece BPE model (tokenizer.model) as a tokenizer.json, read without the sentencepiece library.

Checkpoints of the Llama/Mistral line ship both files: tokenizer.model for tools that speak
SentencePiece (llama.cpp's converter) and tokenizer.json for the `tokenizers` library (our runtime).
This writes the second from the first, in the layout of Mixtral's own tokenizer.json (legacy
normalizer, byte fallback, BOS added), so a checkpoint made with a real tokenizer.model loads in
klotski and converts to GGUF as it is. The model file is a protobuf; the few fields used are read
by hand, so the runtime needs no protobuf or sentencepiece package.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, decoders, models, normalizers, processors
from tokenizers import Tokenizer as HFTokenizer

from klotski.errors import KlotskiError

# sentencepiece_model.proto: ModelProto.pieces = 1, .trainer_spec = 2; SentencePiece.piece = 1,
# .score = 2, .type = 3; TrainerSpec.model_type = 3 (1 unigram, 2 bpe), .byte_fallback = 35.
_NORMAL, _UNKNOWN, _CONTROL, _USER, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BPE = 2
_SPACE = "\u2581"  # SentencePiece's visible space
_RESERVED = "<reserved_{}>"


@dataclass(frozen=True, slots=True)
class Piece:
    """One vocabulary entry of a SentencePiece model: its text, merge score and kind."""

    text: str
    score: float
    kind: int


@dataclass(frozen=True, slots=True)
class SpmModel:
    """The parts of a SentencePiece ModelProto a BPE tokenizer.json needs."""

    pieces: list[Piece]
    model_type: int
    byte_fallback: bool


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A protobuf varint at pos: (value, next position)."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of each field of one protobuf message; value is int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _piece(buf: bytes) -> Piece:
    text, score, kind = "", 0.0, _NORMAL
    for field, _, value in _fields(buf):
        if field == 1:
            text = value.decode("utf-8")
        elif field == 2:
            score = struct.unpack("<f", value)[0]
        elif field == 3:
            kind = value
    return Piece(text, score, kind)


def read_spm_model(path: str | Path) -> SpmModel:
    """Parse a SentencePiece tokenizer.model (pieces, model type, byte fallback)."""
    try:
        buf = Path(path).read_bytes()
        pieces, model_type, byte_fallback = [], 1, False
        for field, _, value in _fields(buf):
            if field == 1:
                pieces.append(_piece(value))
            elif field == 2:
                for tfield, _, tvalue in _fields(value):
                    model_type = tvalue if tfield == 3 else model_type
                    byte_fallback = bool(tvalue) if tfield == 35 else byte_fallback
    except (OSError, ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise KlotskiError(f"{path} is not a readable SentencePiece model ({e})") from e
    if not pieces:
        raise KlotskiError(f"{path} holds no SentencePiece vocabulary")
    return SpmModel(pieces, model_type, byte_fallback)


def _merges(pieces: list[Piece]) -> list[tuple[str, str]]:
    """BPE merges from piece scores: every split of a normal piece into two pieces, best score first.

    SentencePiece BPE merges the adjacent pair whose union has the highest score; `tokenizers` BPE
    applies merges by rank, so ranking the pairs by their union's score gives the same encoding.
    """
    ids = {p.text: i for i, p in enumerate(pieces)}
    ranked = []
    for i, p in enumerate(pieces):
        if p.kind != _NORMAL:
            continue
        splits = [(p.text[:k], p.text[k:]) for k in range(1, len(p.text))]
        splits = [s for s in splits if s[0] in ids and s[1] in ids]
        ranked += [(-p.score, i, ids[l], ids[r], l, r) for l, r in splits]
    ranked.sort()
    return [(l, r) for *_, l, r in ranked]


def spm_to_tokenizer(spm: SpmModel) -> HFTokenizer:
    """A `tokenizers` Tokenizer that encodes and decodes like the SentencePiece BPE model."""
    if spm.model_type != _BPE or not spm.byte_fallback:
        raise KlotskiError(
            "only SentencePiece BPE models with byte fallback (the Llama/Mistral kind) convert to tokenizer.json here"
        )
    unk = next((p.text for p in spm.pieces if p.kind == _UNKNOWN), None)
    bos = next((p.text for p in spm.pieces if p.text == "<s>" and p.kind == _CONTROL), None)
    vocab = {p.text: i for i, p in enumerate(spm.pieces)}
    tok = HFTokenizer(
        models.BPE(vocab=vocab, merges=_merges(spm.pieces), unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    # The legacy Llama layout (Mixtral's tokenizer.json): SentencePiece's dummy prefix and visible spaces.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
    tok.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    tok.add_special_tokens(
        [AddedToken(p.text, normalized=False, special=True) for p in spm.pieces if p.kind in (_UNKNOWN, _CONTROL)]
    )
    return tok


def write_spm_tokenizer(
    out_dir: str | Path, model_file: str | Path, vocab_size: int, chat_template: str | None = None
) -> dict[str, int]:
    """Copy model_file as tokenizer.model and write the matching tokenizer.json + tokenizer_config.json.

    The model may have fewer ids than vocab_size; reserved tokens fill the rest so that every id a
    random-weight model samples decodes. Returns the bos/eos/unk ids.
    """
    spm = read_spm_model(model_file)
    if len(spm.pieces) > vocab_size:
        raise KlotskiError(f"{model_file} has {len(spm.pieces)} ids, more than vocab_size={vocab_size}")
    tok = spm_to_tokenizer(spm)
    tok.add_tokens([AddedToken(_RESERVED.format(i), normalized=False) for i in range(len(spm.pieces), vocab_size)])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, out / "tokenizer.model")
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "legacy": True,
        "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return {k + "_token_id": tok.token_to_id(s) for k, s in (("bos", "<s>"), ("eos", "</s>"), ("unk", "<unk>"))}
