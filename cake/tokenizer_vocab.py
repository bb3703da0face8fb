"""Tokenizers rebuilt from vocabularies: sentencepiece tokenizer.model and GGUF metadata.

Both become a `tokenizers.Tokenizer`: sentencepiece vocabularies (a .model, or a
GGUF "llama" vocabulary) with the normalizer, merges and byte fallback that give
`SentencePieceProcessor.encode`'s ids; GGUF "gpt2" ones as GPT-2 byte-level BPE.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
)
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

# ModelProto.SentencePiece.Type, which GGUF's tokenizer.ggml.token_type repeats
_NORMAL, _UNKNOWN, _BYTE = 1, 2, 6
_SPACE = "\u2581"  # sentencepiece's "▁", its spelling of " "


@dataclass(frozen=True)
class _SpmVocab:
    """A sentencepiece vocabulary and the normalizer settings that shape its input."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    unigram: bool  # else BPE
    charsmap: bytes = b""  # NormalizerSpec.precompiled_charsmap (nmt_nfkc, ...)
    remove_extra_whitespaces: bool = False
    merges: list[tuple[str, str]] | None = None  # None: implied by the scores


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


def _read_spm(proto: bytes) -> tuple[_SpmVocab, bool]:
    """(vocabulary, NormalizerSpec.add_dummy_prefix) of a .model file's ModelProto.

    The sentencepiece API exposes neither the piece types nor the normalizer spec;
    transformers reads them with protobuf.
    """
    pieces, scores, types = [], [], []
    model_type, spec = 1, {}
    for field, value in _proto_fields(proto):
        if field == 1:  # SentencePiece: piece 1, score 2, type 3
            piece = dict(_proto_fields(value))
            pieces.append(piece.get(1, b"").decode())
            scores.append(struct.unpack("<f", piece.get(2, bytes(4)))[0])
            types.append(piece.get(3, _NORMAL))
        elif field == 2:  # TrainerSpec: model_type 3 (1 unigram, 2 BPE, 3 word, 4 char)
            model_type = dict(_proto_fields(value)).get(3, 1)
        elif field == 3:  # NormalizerSpec
            spec = dict(_proto_fields(value))
    if model_type not in (1, 2):
        name = {3: "WORD", 4: "CHAR"}.get(model_type, model_type)
        raise TokenizerError(
            f"sentencepiece model type {name} is not supported; cake reads "
            "UNIGRAM and BPE models"
        )
    if not spec.get(5, True):
        raise TokenizerError(
            "the sentencepiece model keeps spaces unescaped (escape_whitespaces: "
            "false), which cake does not support"
        )
    vocab = _SpmVocab(
        pieces,
        scores,
        types,
        unigram=model_type == 1,
        charsmap=spec.get(2, b""),
        remove_extra_whitespaces=bool(spec.get(4, True)),
    )
    return vocab, bool(spec.get(3, True))


def _from_sentencepiece(file: Path) -> Tokenizer:
    import sentencepiece

    config, kwargs = _folder_settings(file.parent)
    try:
        proto = file.read_bytes()
        sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        vocab, dummy_prefix = _read_spm(proto)
    except TokenizerError:
        raise
    except Exception as err:  # sentencepiece raises RuntimeError/OSError/...
        raise TokenizerError(
            f"cannot load {file}: {err}; the file is corrupt or not a sentencepiece model"
        ) from err
    if dummy_prefix and not sp.normalize("a").startswith(_SPACE):
        raise TokenizerError(
            f"{file} puts its dummy space after the text (treat_whitespace_as_suffix), "
            "which cake does not support"
        )
    prefix = config.get("add_prefix_space")
    if prefix is None:
        prefix = dummy_prefix
    scheme = "never" if not prefix else "always" if config.get("legacy") else "first"
    backend = _sentencepiece_backend(vocab, scheme)
    named, added = _config_tokens(config)
    spm_ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    for name, index in spm_ids.items():
        if named[f"{name}_token"] is None and index >= 0:
            named[f"{name}_token"] = vocab.pieces[index]
    add_bos = config.get("add_bos_token", True)  # sentencepiece models start with BOS
    add_eos = config.get("add_eos_token", False)
    added = [_normalized(t, scheme, backend.normalizer) for t in added]
    added += [
        _normalized(AddedToken(t, special=True), scheme, backend.normalizer)
        for t in named.values()
        if t
    ]
    return _finish(backend, named, added, add_bos, add_eos, **kwargs)


def _normalized(token: AddedToken, prefix: str, normalizer: Any) -> AddedToken:
    """The token, matched after the normalizer where the prefix scheme needs it.

    With "first", the normalizer must see the whole text, so that the dummy prefix
    goes before the text only: a token matched in the raw text would cut the text
    into pieces normalized one by one. A token the normalizer would respell (one
    with a space, say) keeps its setting.
    """
    if token.normalized or prefix != "first":
        return token
    if normalizer.normalize_str(token.content) != token.content:
        return token
    return AddedToken(
        token.content,
        single_word=token.single_word,
        lstrip=token.lstrip,
        rstrip=token.rstrip,
        normalized=True,
        special=token.special,
    )


def _sentencepiece_backend(vocab: _SpmVocab, prefix: str) -> _Backend:
    """The pipeline of `SentencePieceProcessor.encode` in `tokenizers` parts.

    prefix: "first" puts the dummy "▁" before the text (and not after a special
    token, as transformers' LlamaTokenizer does), "always" before every stretch of
    text between special tokens (transformers' legacy=True), "never" nowhere.
    Control and unknown pieces become special tokens; user-defined pieces are
    matched in the normalized text and never merged, as sentencepiece does.
    """
    pieces, types = vocab.pieces, vocab.types
    user_defined = [p for p, t in zip(pieces, types, strict=True) if t == _USER_DEFINED]
    byte_fallback = _BYTE in types
    unk = next((i for i, t in enumerate(types) if t == _UNKNOWN), None)
    if vocab.unigram:
        model = models.Unigram(
            list(zip(pieces, vocab.scores, strict=True)),
            unk,
            byte_fallback=byte_fallback,
        )
    else:
        ids = {piece: i for i, piece in enumerate(pieces)}
        merges = vocab.merges
        if merges is None:
            # sentencepiece merges the adjacent pair whose union is the best-scored
            # normal piece, so merges rank by score, not by id: Llama's runs of "▁"
            # score below everything and " Hello" is ["▁", "▁Hello"], not ["▁▁", ...].
            normal = {
                p: s
                for p, s, t in zip(pieces, vocab.scores, types, strict=True)
                if t == _NORMAL
            }
            merges = _merges({p: ids[p] for p in normal}, normal)
        model = models.BPE(
            ids,
            merges,
            unk_token=None if unk is None else pieces[unk],
            fuse_unk=True,
            byte_fallback=byte_fallback,
            # a user-defined piece, cut out whole by the pre-tokenizer, is no merge
            ignore_merges=bool(user_defined),
        )
    backend = _Backend(model)
    backend.normalizer = _spm_normalizer(vocab, prefix)
    split = [pre_tokenizers.Metaspace(_SPACE, prepend_scheme=prefix, split=False)]
    if user_defined:
        longest_first = sorted(user_defined, key=len, reverse=True)
        pattern = Regex("|".join(map(re.escape, longest_first)))
        split.append(pre_tokenizers.Split(pattern, behavior="isolated"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(split)
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix != "never":
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    backend.add_special_tokens(
        [
            _normalized(AddedToken(p, special=True), prefix, backend.normalizer)
            for p, t in zip(pieces, types, strict=True)
            if t in (_CONTROL, _UNKNOWN)
        ]
    )
    return backend


def _spm_normalizer(vocab: _SpmVocab, prefix: str) -> normalizers.Normalizer:
    """sentencepiece's normalizer; the dummy "▁" itself comes from Metaspace.

    Metaspace adds it only where the text does not start with "▁" already (and,
    with "first", only at offset 0), so the steps leave one "▁" more at the start
    where sentencepiece has one there besides its dummy, and keep offset 0 there:
    " Hello" is "▁▁Hello" (Llama's [29871, 15043]).
    """
    steps = [normalizers.Precompiled(vocab.charsmap)] if vocab.charsmap else []
    dummy = prefix != "never"
    if vocab.remove_extra_whitespaces:
        # Trims and squeezes spaces only (after the charsmap), not tabs or newlines;
        # a "▁" in the text counts as a space at the end only. A run of leading
        # spaces becomes the "▁" of the dummy prefix rather than going.
        if dummy:
            steps.append(normalizers.Replace(Regex(rf"\A{_SPACE}"), _SPACE * 2))
        steps.append(normalizers.Replace(Regex(rf"[ {_SPACE}]+\z"), ""))
        if not dummy:
            steps.append(normalizers.Replace(Regex(r"\A +"), ""))
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
        steps.append(normalizers.Replace(" ", _SPACE))
    else:
        steps.append(normalizers.Replace(" ", _SPACE))
        if dummy:
            steps.append(normalizers.Replace(Regex(rf"\A{_SPACE}"), _SPACE * 2))
    return normalizers.Sequence(steps)


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


def _add_gguf_tokens(backend: _Backend, tokens: list[str], types: list[int]) -> None:
    """Control tokens as special tokens, user-defined ones as added tokens.

    A control token spelled outside the byte alphabet is a llama.cpp mislabel and
    is skipped.
    """
    alphabet = set(_bytes_to_unicode().values())
    backend.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, kind in zip(tokens, types, strict=False)
            if kind == _CONTROL and set(t) <= alphabet
        ]
    )
    vocab = backend.get_vocab()
    backend.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, types, strict=False)
            if kind == _USER_DEFINED and t in vocab
        ]
    )


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
        _add_gguf_tokens(backend, tokens, types)
        prefix, add_bos = "never", False
    elif kind == "llama":
        # A sentencepiece vocabulary: llama.cpp's converter writes the .model's
        # pieces, scores and types, and llama.cpp encodes it without a normalizer.
        scores = meta("ggml.scores") or [0.0] * len(tokens)
        if not len(tokens) == len(scores) == len(types):
            raise TokenizerError(
                f"the GGUF vocabulary has {len(tokens)} tokens but {len(scores)} "
                f"scores and {len(types)} token types; the file is damaged"
            )
        vocab = _SpmVocab(
            list(tokens),
            list(scores),
            list(types),
            unigram=False,
            merges=[tuple(m.split(" ", 1)) for m in merges] if merges else None,
        )
        prefix = "first" if meta("ggml.add_space_prefix", True) else "never"
        backend = _sentencepiece_backend(vocab, prefix)
        add_bos = True  # llama.cpp adds BOS unless told otherwise
    else:
        raise TokenizerError(
            f"the GGUF tokenizer type {kind!r} is not supported; cake reads "
            "'gpt2' (byte-level BPE) and 'llama' (sentencepiece) vocabularies"
        )
    ids = {n: meta(f"ggml.{key}_token_id") for n, key in _GGUF_IDS.items()}
    named = {
        f"{n}_token": tokens[i] if i is not None and 0 <= i < len(tokens) else None
        for n, i in ids.items()
    }
    eos_ids = [meta(f"ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    named_added = [AddedToken(t, special=True) for t in named.values() if t]
    return _finish(
        backend,
        named,
        [_normalized(t, prefix, backend.normalizer) for t in named_added],
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
