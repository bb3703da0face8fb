"""cake's sentencepiece tokenizers give `SentencePieceProcessor.encode`'s ids.

The models are trained here, on a generated text, in the configurations real
models use: Llama's (BPE, byte fallback, no normalization, spaces kept, runs of
"▁" scored below every other piece as in Llama 2's file), sentencepiece's
defaults (nmt_nfkc, extra spaces removed), unigram (T5-like), user-defined
pieces, no dummy prefix. Each is read as a tokenizer.model and, for the ones
llama.cpp can represent, as a GGUF "llama" vocabulary written from its pieces.

Texts hold no control pieces such as "<s>": sentencepiece reads them as plain
text, cake as the special token (tests/test_tokenizer.py checks that against HF).
"""

from __future__ import annotations

import io
import json
import random
import struct
from pathlib import Path

import pytest

from cake.errors import TokenizerError
from cake.tokenizer import Tokenizer, load_tokenizer

spm = pytest.importorskip("sentencepiece")

WORDS = (
    "hello world the quick brown fox jumps over a lazy dog Hello World tokenizer "
    "piece def return print import café naïve résumé über 中文 日本語 한국어 data "
    "x_y foo(bar) {a: 1} 42 3.14 2024"
).split()
# Not in the training text: these need byte fallback (or come out as <unk>), and
# the nmt_nfkc models rewrite some (ﬁ -> fi, ① -> 1, Ａ -> A, U+3000 -> space).
RARE = ["😀", "🎉👍🏽", "👨‍👩‍👧", "ẞ", "ﬁ", "①", "Ａ", "\u3000", "\u00a0", "Ω≈ç√"]
PIECES = [
    *WORDS,
    *RARE,
    "if x:\n    return y\n",
    "\tindented\n\t\tmore",
    "0123456789",
    "\r\n",
    "\n\n",
    "▁",
    "▁▁x",
    "<sep>",
    "<s",
    "/s>",
    "@@",
]
FIXED = [
    "",
    " ",
    "  ",
    "\n",
    "\t",
    "Hello",
    " Hello",
    "  Hello",
    "   Hello",
    "Hello ",
    "Hello  ",
    "a  b",
    "a \n b",
    "▁Hello",
    " ▁x",
    "x ▁",
    "Hello world",
    "  leading spaces,\n\n\ttabs and  double  spaces  ",
    "digits 12345 + 678 = 9, pi ~ 3.14159",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧",
    "héllo café naïve Ünïcödé ẞ",
    "中文测试，日本語のテキスト、한국어",
    "def f(x):\n    return x ** 2  # square\n",
    "line\r\nbreaks\r\n",
]


def _line(rng: random.Random, pieces: list[str]) -> str:
    out = ""
    for _ in range(rng.randint(1, 12)):
        out += rng.choice(["", " ", " ", " ", "  ", "   ", "    ", "\t", "\n", ", "])
        out += rng.choice(pieces)
    return out + rng.choice(["", "", " ", "  ", "\n", "\t"])


CORPUS = [_line(random.Random(i), WORDS) for i in range(3000)]
TEXTS = FIXED + [_line(random.Random(-1 - i), PIECES) for i in range(300)]

LLAMA = dict(
    model_type="bpe",
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    vocab_size=500,
)
MODELS = {
    "llama": LLAMA,
    "bpe_defaults": dict(model_type="bpe", byte_fallback=True, vocab_size=500),
    "unigram": dict(model_type="unigram", vocab_size=250),
    "unigram_bytes": dict(
        model_type="unigram",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        vocab_size=420,
    ),
    "user_defined": dict(LLAMA, user_defined_symbols=["<sep>", "@@", "▁▁▁▁"]),
    "no_prefix": dict(LLAMA, add_dummy_prefix=False),
}
# llama.cpp's "llama" vocabulary has no normalizer: only models without one.
GGUF_MODELS = ["llama", "user_defined", "no_prefix"]


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        value |= (buf[pos] & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if buf[pos - 1] < 0x80:
            return value, pos


def _llama_scores(proto: bytes) -> bytes:
    """The model with each run of 2+ "▁" scored below every other piece, as Llama
    2's file ranks them: there " Hello" is ["▁", "▁Hello"] (29871, 15043) although
    "▁▁" (259) has the lowest id of the three."""
    buf, pos = bytearray(proto), 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        size, pos = _varint(buf, pos)  # every ModelProto field is a message
        end, at, piece = pos + size, pos, ""
        while key >> 3 == 1 and at < end:  # SentencePiece: piece 1, score 2, type 3
            field, at = _varint(buf, at)
            if field & 7 == 2:
                n, at = _varint(buf, at)
                piece, at = bytes(buf[at : at + n]).decode(), at + n
            elif field & 7 == 5:
                if field >> 3 == 2 and len(piece) > 1 and set(piece) == {"▁"}:
                    buf[at : at + 4] = struct.pack("<f", -1e9)
                at += 4
            else:
                _, at = _varint(buf, at)
        pos = end
    return bytes(buf)


def _train(**options) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        character_coverage=1.0,
        hard_vocab_limit=False,  # vocab_size at most, for unigram on a tiny text
        minloglevel=2,
        **options,
    )
    return model.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """name -> tokenizer.model, each alone in its folder."""
    files = {}
    for name, options in MODELS.items():
        proto = _train(**options)
        if options.get("model_type") == "bpe" and options.get(
            "allow_whitespace_only_pieces"
        ):
            proto = _llama_scores(proto)
        files[name] = tmp_path_factory.mktemp(name) / "tokenizer.model"
        files[name].write_bytes(proto)
    return files


def _processor(file: Path):
    return spm.SentencePieceProcessor(model_file=str(file))


def _assert_encodes_like(ours: Tokenizer, sp, texts=TEXTS) -> None:
    wrong = []
    for text in texts:
        expected = sp.encode(text)
        if ours.encode(text, add_special_tokens=False) != expected:
            wrong.append(text)
        elif ours.encode(text) != [sp.bos_id(), *expected]:
            wrong.append(text)
    assert not wrong, f"{len(wrong)} of {len(texts)} texts differ, e.g. {wrong[:5]}"


@pytest.mark.parametrize("name", MODELS)
def test_ids_match_sentencepiece(trained, name):
    sp = _processor(trained[name])
    _assert_encodes_like(load_tokenizer(trained[name]), sp)


@pytest.mark.parametrize("name", MODELS)
def test_decode_round_trips_as_sentencepiece(trained, name):
    ours, sp = load_tokenizer(trained[name]), _processor(trained[name])
    for text in TEXTS:
        ids = sp.encode(text)
        if sp.unk_id() in ids:  # sentencepiece writes " ⁇ ", transformers "<unk>"
            assert ours.decode(ids) != sp.decode(ids)
            continue
        assert ours.decode(ids) == sp.decode(ids), text
        plain = ours.encode(text, add_special_tokens=False)
        assert ours.decode(plain) == sp.decode(ids), text
        with_bos = ours.encode(text)
        assert ours.decode(with_bos, skip_special_tokens=True) == sp.decode(ids)


@pytest.mark.parametrize("name", ["llama", "bpe_defaults", "unigram", "user_defined"])
def test_saved_tokenizer_json_encodes_the_same(trained, name, tmp_path):
    """cake split exports the tokenizer as tokenizer.json; it must not lose the
    normalizer (charsmap included) or the added tokens' settings."""
    (tmp_path / "tokenizer.json").write_text(load_tokenizer(trained[name]).to_json())
    _assert_encodes_like(load_tokenizer(tmp_path), _processor(trained[name]))


def test_leading_spaces_as_llama(trained):
    """The issue's cases: Llama gives " Hello" as [29871 "▁", 15043 "▁Hello"] and
    "  Hello" as [259 "▁▁", 15043], where cake gave [15043] and [259, 10994]."""
    ours, sp = load_tokenizer(trained["llama"]), _processor(trained["llama"])
    pieces = {
        " Hello": ["▁", "▁Hello"],
        "  Hello": ["▁▁", "▁Hello"],
        "Hello": ["▁Hello"],
        " ": ["▁▁"],
    }
    for text, expected in pieces.items():
        ids = ours.encode(text, add_special_tokens=False)
        assert [sp.id_to_piece(i) for i in ids] == expected, text
        assert ids == sp.encode(text)
    assert sp.piece_to_id("▁▁") < sp.piece_to_id("▁Hello")  # scores, not ids, rank


def test_user_defined_pieces_stay_whole(trained):
    ours, sp = (
        load_tokenizer(trained["user_defined"]),
        _processor(trained["user_defined"]),
    )
    for text in ["a<sep>b", "<sep>", " <sep> x", "x@@y@@", "a     b"]:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
    assert sp.piece_to_id("<sep>") in ours.encode("a<sep>b")


def _write_gguf(model: Path, path: Path, user_defined: list[str]) -> Path:
    """A GGUF holding only the model's vocabulary, as llama.cpp's converter writes
    it: pieces, scores and token types (1 normal, 2 unknown, 3 control,
    4 user-defined, 5 unused, 6 byte)."""
    gguf = pytest.importorskip("gguf")
    sp = _processor(model)
    ids = range(sp.get_piece_size())
    pieces = [sp.id_to_piece(i) for i in ids]
    types = [
        3
        if sp.is_control(i)
        else 2
        if sp.is_unknown(i)
        else 6
        if sp.is_byte(i)
        else 5
        if sp.is_unused(i)
        else 4
        if pieces[i] in user_defined
        else 1
        for i in ids
    ]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([sp.get_score(i) for i in ids])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_space_prefix(sp.encode("a", out_type=str)[0].startswith("▁"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("name", GGUF_MODELS)
def test_gguf_vocabulary_ids_match_sentencepiece(trained, name, tmp_path):
    user_defined = MODELS[name].get("user_defined_symbols", [])
    path = _write_gguf(trained[name], tmp_path / "vocab.gguf", user_defined)
    ours, sp = load_tokenizer(path), _processor(trained[name])
    _assert_encodes_like(ours, sp)
    model_file = load_tokenizer(trained[name])
    for text in TEXTS[:50]:
        assert ours.decode(ours.encode(text)) == model_file.decode(
            model_file.encode(text)
        )


def test_legacy_prefixes_every_stretch_of_text(trained, tmp_path):
    """legacy=True (transformers' older LlamaTokenizer) encodes the text between
    special tokens as sentencepiece encodes each stretch alone."""
    (tmp_path / "tokenizer.model").write_bytes(trained["llama"].read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": True}))
    ours, sp = load_tokenizer(tmp_path), _processor(trained["llama"])
    _assert_encodes_like(ours, sp, TEXTS[:60])
    for before, after in zip(TEXTS[:40], TEXTS[40:80], strict=True):
        ids = ours.encode(before + "</s>" + after, add_special_tokens=False)
        assert ids == [*sp.encode(before), sp.eos_id(), *sp.encode(after)]


def test_config_tokens_cut_the_text_as_control_pieces(trained, tmp_path):
    """A token added by tokenizer_config.json (as transformers saves it, not
    normalized) leaves the text around it as the model's own </s> does."""
    (tmp_path / "tokenizer.model").write_bytes(trained["llama"].read_bytes())
    added = {"content": "<|im_start|>", "normalized": False, "special": True}
    config = {"added_tokens_decoder": {"500": added}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_tokenizer(tmp_path)
    new_id, eos = ours.token_to_id("<|im_start|>"), ours.token_to_id("</s>")
    assert new_id is not None
    for before, after in zip(TEXTS[:40], TEXTS[40:80], strict=True):
        ids = ours.encode(before + "<|im_start|>" + after)
        same = ours.encode(before + "</s>" + after)
        assert ids == [new_id if i == eos else i for i in same], (before, after)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(model_type="word", vocab_size=60), "WORD"),
        (
            dict(model_type="bpe", vocab_size=300, treat_whitespace_as_suffix=True),
            "suffix",
        ),
    ],
)
def test_unsupported_models_raise(tmp_path, options, message):
    (tmp_path / "tokenizer.model").write_bytes(_train(**options))
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(tmp_path / "tokenizer.model")
