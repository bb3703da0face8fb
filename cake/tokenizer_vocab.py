"""Tokenizers rebuilt from vocabularies: sentencepiece tokenizer.model and GGUF metadata.

Both become a `tokenizers.Tokenizer` shaped the way transformers builds it
(LlamaTokenizer's byte-fallback BPE/Unigram with Metaspace; GPT-2 byte-level BPE).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from cake.errors import TokenizerError
from cake.tokenizer import (
    _CONTROL,
    _USER_DEFINED,
    Tokenizer,
    _config_tokens,
    _finish,
    _folder_settings,
)

# Split regexes for GGUF `tokenizer.ggml.pre` values whose merges were learned on
# another split than GPT-2's; the rest keep ByteLevel's built-in GPT-2 regex.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "lfm2"),
        _LLAMA3,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O),
}


# --- sentencepiece tokenizer.model


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes) -> Iterable[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message; enough to read a .model."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield key >> 3, value


def _spm_model_info(proto: bytes) -> tuple[int, set[int]]:
    """(trainer model_type: 1 unigram, 2 BPE, ...; ids of user-defined pieces).

    The sentencepiece API exposes neither; transformers reads them with protobuf.
    """
    model_type, user_defined, index = 1, set(), 0
    for field, value in _proto_fields(proto):
        if field == 1:  # ModelProto.pieces: SentencePiece.type is field 3
            if any(f == 3 and v == _USER_DEFINED for f, v in _proto_fields(value)):
                user_defined.add(index)
            index += 1
        elif field == 2:  # ModelProto.trainer_spec: TrainerSpec.model_type is field 3
            model_type = next((v for f, v in _proto_fields(value) if f == 3), 1)
    return model_type, user_defined


def _from_sentencepiece(file: Path) -> Tokenizer:
    import sentencepiece

    config, kwargs = _folder_settings(file.parent)
    try:
        proto = file.read_bytes()
        sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        model_type, user_defined = _spm_model_info(proto)
    except Exception as err:  # sentencepiece raises RuntimeError/OSError/...
        raise TokenizerError(
            f"cannot load {file}: {err}; the file is corrupt or not a sentencepiece model"
        ) from err
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    unk = pieces[sp.unk_id()] if sp.unk_id() >= 0 else None
    if model_type == 2:  # BPE, rebuilt from the vocabulary as transformers does
        vocab = {piece: i for i, piece in enumerate(pieces)}
        model = models.BPE(
            vocab, _merges(vocab), unk_token=unk, fuse_unk=True, byte_fallback=True
        )
    else:
        scored = [(piece, sp.get_score(i)) for i, piece in enumerate(pieces)]
        has_bytes = any(sp.is_byte(i) for i in range(len(pieces)))
        unk_id = sp.unk_id() if sp.unk_id() >= 0 else None
        model = models.Unigram(scored, unk_id, byte_fallback=has_bytes)
    backend = _Backend(model)
    prefix = config.get("add_prefix_space")
    if prefix is None:  # the model's own normalizer says whether it adds "▁"
        prefix = sp.normalize("a").startswith("\u2581")
    scheme = "never" if not prefix else "always" if config.get("legacy") else "first"
    _sentencepiece_shape(backend, scheme)
    control = [
        AddedToken(p, normalized=False, special=sp.is_control(i))
        for i, p in enumerate(pieces)
        if sp.is_control(i) or i in user_defined
    ]
    named, added = _config_tokens(config)
    spm_ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    for name, index in spm_ids.items():
        if named[f"{name}_token"] is None and index >= 0:
            named[f"{name}_token"] = pieces[index]
    add_bos = config.get("add_bos_token", True)  # sentencepiece models start with BOS
    add_eos = config.get("add_eos_token", False)
    return _finish(backend, named, control + added, add_bos, add_eos, **kwargs)


def _sentencepiece_shape(backend: _Backend, prepend_scheme: str) -> None:
    """Pre-tokenizer and decoder of transformers' LlamaTokenizer: spaces become "▁",
    bytes come back from <0xNN> pieces, and the added leading space is dropped."""
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme=prepend_scheme, split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prepend_scheme != "never":
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)


def _merges(
    vocab: Mapping[str, int], scores: Mapping[str, float] | None = None
) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: every split of a token into two tokens,
    best first (by token score when given, else by token id)."""
    keys = scores if scores is not None else vocab
    found = []
    for token, key in keys.items():
        pairs = [
            (token[:i], token[i:], key)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        found += sorted(pairs, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=scores is not None)
    return [(left, right) for left, right, _ in found]


# --- GGUF: the vocabulary stored as llama.cpp metadata


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level vocabularies use."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def _byte_level(tokens: list[str], merges: list[str], pre: str | None) -> _Backend:
    """Byte-level BPE, like transformers' GPT2Tokenizer plus the file's split regex."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A few files store a token as real text; the vocabulary spells it in bytes.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
        for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = _Backend(
        models.BPE(vocab, pairs, continuing_subword_prefix="", end_of_word_suffix="")
    )
    split = _GGUF_SPLITS.get(pre or "")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not split)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]
        )
        if split
        else byte_level
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def gguf_tokenizer(reader: Any) -> Tokenizer:
    """The tokenizer stored in an open `gguf.GGUFReader`'s metadata."""

    def meta(key: str, default: Any = None) -> Any:
        field = reader.fields.get(f"tokenizer.{key}")
        return default if field is None else field.contents()

    kind, tokens = meta("ggml.model"), meta("ggml.tokens")
    if not tokens:
        raise TokenizerError("the GGUF file has no tokenizer vocabulary")
    types = meta("ggml.token_type") or [1] * len(tokens)
    merges = meta("ggml.merges")
    if kind == "gpt2":
        backend = _byte_level(tokens, merges or [], meta("ggml.pre"))
        alphabet, add_bos = set(_bytes_to_unicode().values()), False
    elif kind == "llama":
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = (
            [tuple(m.split(" ", 1)) for m in merges]
            if merges
            else _merges(
                vocab, dict(zip(tokens, meta("ggml.scores") or [], strict=False))
            )
        )
        backend = _Backend(models.BPE(vocab, pairs, fuse_unk=True, byte_fallback=True))
        prefix = meta("ggml.add_space_prefix", True)
        _sentencepiece_shape(backend, "first" if prefix else "never")
        alphabet, add_bos = None, True  # llama.cpp adds BOS unless told otherwise
    else:
        raise TokenizerError(
            f"the GGUF tokenizer type {kind!r} is not supported; cake reads "
            "'gpt2' (byte-level BPE) and 'llama' (sentencepiece) vocabularies"
        )
    # Control tokens stay whole as special tokens; in a byte-level vocabulary one
    # spelled outside the byte alphabet is a llama.cpp mislabel and is skipped.
    backend.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, kind_ in zip(tokens, types, strict=False)
            if kind_ == _CONTROL and (alphabet is None or set(t) <= alphabet)
        ]
    )
    vocab = backend.get_vocab()
    backend.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, kind_ in zip(tokens, types, strict=False)
            if kind_ == _USER_DEFINED and t in vocab
        ]
    )
    ids = {n: meta(f"ggml.{key}_token_id") for n, key in _GGUF_IDS.items()}
    named = {
        f"{n}_token": tokens[i] if i is not None and 0 <= i < len(tokens) else None
        for n, i in ids.items()
    }
    eos_ids = [meta(f"ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    return _finish(
        backend,
        named,
        [],
        meta("ggml.add_bos_token", add_bos),
        meta("ggml.add_eos_token"),
        eos_token_ids=[i for i in eos_ids if i is not None],
        chat_template=meta("chat_template") or None,
    )


_GGUF_IDS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}


def _from_gguf(path: Path) -> Tokenizer:
    try:
        from cake.weights.gguf import _Reader

        reader = _Reader(path, "r")
    except Exception as err:  # numpy/struct errors on a truncated or foreign file
        raise TokenizerError(f"cannot read {path} as GGUF: {err}") from err
    return gguf_tokenizer(reader)
