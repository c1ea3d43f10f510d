"""A SentencePiece BPE model, written here as protobuf bytes, becomes a matching tokenizer.json."""

import json
import struct

import pytest

from klotski.errors import KlotskiError
from klotski.spm_tokenizer import read_spm_model, write_spm_tokenizer
from klotski.tokenizer import Tokenizer

NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _piece(text: str, score: float, kind: int) -> bytes:
    return _field(1, text.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", score) + _varint(3 << 3) + _varint(kind)


def _model(bpe: bool = True) -> bytes:
    pieces = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    pieces += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    # Merge order by score: "▁h" first, then "el", "▁hel", "lo", "▁hello" (via "▁hel" + "lo").
    merged = ["▁h", "el", "▁hel", "lo", "▁hello"]
    pieces += [(t, -float(i), NORMAL) for i, t in enumerate(merged)]
    pieces += [(c, -100.0 - i, NORMAL) for i, c in enumerate("▁helo")]
    trainer = _varint(3 << 3) + _varint(2 if bpe else 1) + _varint(35 << 3) + _varint(1)
    return b"".join(_field(1, _piece(*p)) for p in pieces) + _field(2, trainer)


def test_reads_pieces_and_trainer_spec(tmp_path):
    (tmp_path / "m.model").write_bytes(_model())
    spm = read_spm_model(tmp_path / "m.model")
    assert spm.pieces[1].text == "<s>" and spm.pieces[3].text == "<0x00>"
    assert spm.model_type == 2 and spm.byte_fallback


def test_tokenizer_json_encodes_like_sentencepiece_bpe(tmp_path):
    (tmp_path / "m.model").write_bytes(_model())
    special = write_spm_tokenizer(tmp_path / "out", tmp_path / "m.model", vocab_size=300)
    assert special == {"bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0}
    tok = Tokenizer.from_dir(tmp_path / "out")
    ids = tok.encode("hello hel")
    pieces = [tok._tok.id_to_token(i) for i in ids]
    assert pieces == ["<s>", "▁hello", "▁hel"]  # BOS added, dummy prefix, merges by score
    assert tok.decode(ids) == "hello hel"
    assert tok.decode(tok.encode("hé!")) == "hé!"  # unknown characters fall back to bytes
    assert tok.vocab_size == 300 and (tmp_path / "out" / "tokenizer.model").is_file()


def test_unigram_or_too_large_models_are_refused(tmp_path):
    (tmp_path / "u.model").write_bytes(_model(bpe=False))
    with pytest.raises(KlotskiError, match="BPE"):
        write_spm_tokenizer(tmp_path / "out", tmp_path / "u.model", vocab_size=300)
    (tmp_path / "m.model").write_bytes(_model())
    with pytest.raises(KlotskiError, match="more than vocab_size"):
        write_spm_tokenizer(tmp_path / "out", tmp_path / "m.model", vocab_size=100)


def test_create_model_ships_the_sentencepiece_model(tmp_path):
    from klotski.commands.create_model import create_model

    (tmp_path / "m.model").write_bytes(_model())
    out = create_model(tmp_path / "ckpt", "mixtral", tokenizer_model=tmp_path / "m.model")
    assert (out / "tokenizer.model").read_bytes() == _model()
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert Tokenizer.from_dir(out).encode("hello")[:2] == [
        1,
        263,
    ]  # <s>, "▁hello" (3 specials + 256 bytes + 4 merges before it)
