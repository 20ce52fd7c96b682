"""Hugging Face tokenizer directories read without transformers or torch: `tokenizer.json`
through the `tokenizers` library, or a lone `tokenizer.model` / `spiece.model` through
SentencePiece, with the special tokens, framing and decoding transformers 5 gives them
(`tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json`): the vocabulary of
imported weights (mmjax.convert).
"""

import dataclasses
import json
import re
import string
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from etils import epath

from mmjax.data.tokenizer_base import SPIECE_UNDERLINE, Tokenizer, load_sentencepiece, one_line
from mmjax.errors import UserError

_HF_JSON = "tokenizer.json"
_HF_SENTENCEPIECE = ("tokenizer.model", "spiece.model")
_SPECIAL_KEYS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"
)  # fmt: skip
# ModelProto tails setting one normalizer_spec flag to false: protobuf merges a message field
# that repeats, so appended to a model they override its own add_dummy_prefix and
# remove_extra_whitespaces (what transformers does through the protobuf classes).
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"
_KEEP_WHITESPACE = b"\x1a\x02\x20\x00"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# The special tokens of the transformers 5 classes we import, where a config leaves one out
_CLASS_SPECIALS = {
    "LlamaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "GemmaTokenizer": {
        "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
        "mask_token": "<mask>",
    },
    "SiglipTokenizer": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"},
    "Qwen2Tokenizer": {
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"
    },
    "CLIPTokenizer": {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    },
}  # fmt: skip
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# The classes transformers 5 converts to a tokenizers BPE when it reads their SentencePiece model
_CONVERTED = ("LlamaTokenizer", "GemmaTokenizer")


class _Added(NamedTuple):
    """A token split out of the text before the vocabulary model sees the rest (transformers'
    AddedToken): named specials, a checkpoint's added tokens, SentencePiece control pieces."""

    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False
    single_word: bool = False

    @classmethod
    def parse(cls, value: Any, special: bool) -> "_Added":
        """From a tokenizer_config.json value: a string or an AddedToken's fields."""
        fields = dict(value) if isinstance(value, dict) else {"content": str(value)}
        fields = {k: fields[k] for k in cls._fields if k in fields}
        fields.setdefault("special", special)
        fields.setdefault("normalized", not fields["special"])
        return cls(**fields)


def _read_json(path: epath.Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {one_line(e)}") from None


@dataclasses.dataclass(frozen=True)
class _HFConfig:
    """What transformers 5 reads of a tokenizer directory besides its vocabulary:
    tokenizer_config.json, and special_tokens_map.json and added_tokens.json where that has no
    added_tokens_decoder (older checkpoints)."""

    kind: str  # tokenizer_class without "Fast"
    options: dict[str, Any]  # tokenizer_config.json (with special_tokens_map.json)
    named: dict[str, _Added]  # "bos_token" -> its token, for those set
    added: dict[int, _Added]  # tokens at fixed ids
    extra: tuple[_Added, ...]  # further special tokens

    @classmethod
    def read(cls, directory: epath.Path) -> "_HFConfig":
        options = _read_json(directory / "tokenizer_config.json")
        decoder = options.get("added_tokens_decoder")
        added = {int(i): _Added.parse(t, special=False) for i, t in (decoder or {}).items()}
        if decoder is None:
            options |= _read_json(directory / "special_tokens_map.json")
        kind = str(options.get("tokenizer_class") or "").removesuffix("Fast")
        options = _CLASS_SPECIALS.get(kind, {}) | options
        by_content = {t.content: t for t in added.values()}
        named = {
            key: by_content.get(token.content, token)
            for key in _SPECIAL_KEYS
            if options.get(key)
            for token in [_Added.parse(options[key], special=True)]
        }
        extra = options.get("extra_special_tokens") or options.get("additional_special_tokens")
        own = [  # model-specific specials such as image_token (a dict of them in v5 configs)
            value
            for key, value in options.items()
            if key.endswith("_token") and key not in _SPECIAL_KEYS and isinstance(value, str | dict)
        ]
        own += list(extra.values()) if isinstance(extra, dict) else list(extra or [])
        extras = tuple(_Added.parse(t, special=True) for t in own)
        if decoder is None:
            specials = {t.content for t in (*named.values(), *extras)}
            for content, i in _read_json(directory / "added_tokens.json").items():
                added[int(i)] = _Added.parse(content, special=content in specials)
        return cls(kind, options, named, added, extras)


def _llama_prefix(options: dict[str, Any]) -> tuple[str, bool]:
    """(Metaspace prepend scheme, whether decoding drops the prefix's space) of a Llama
    tokenizer in transformers 5: "▁" before the text's start, or before every chunk between
    added tokens with `legacy`, or nowhere without `add_prefix_space`."""
    prefix = options.get("add_prefix_space") is not False
    return ("always" if options.get("legacy") else "first") if prefix else "never", prefix


def _room(specials: int, max_len: int) -> int:
    """How many text ids fit next to `specials` framing ids in `max_len`."""
    if max_len < specials:
        raise UserError(f"data.max_text_len {max_len} cannot hold the {specials} special tokens")
    return max_len - specials


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization: no space before punctuation and contractions."""
    for spaced in (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're"):
        text = text.replace(spaced, spaced.strip())
    return text


class _JsonVocabulary:
    """tokenizer.json through the `tokenizers` library, set up as transformers 5 sets it up:
    its Llama text handling (`_llama_prefix`), the config's tokens the file lacks added."""

    def __init__(self, file: epath.Path, config: _HFConfig) -> None:
        try:
            import tokenizers
        except ImportError:
            raise UserError(f"reading {file} needs the tokenizers package") from None
        try:
            self._tok = tokenizers.Tokenizer.from_str(file.read_text())
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise UserError(
                f"cannot read the Hugging Face tokenizer {file}: {one_line(e)}"
            ) from None
        self._tok.no_truncation()
        self._tok.no_padding()
        if config.kind == "LlamaTokenizer":
            scheme, strip = _llama_prefix(config.options)
            self._tok.normalizer = None
            self._tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(
                replacement=SPIECE_UNDERLINE, prepend_scheme=scheme, split=False
            )
            decoders = tokenizers.decoders
            steps = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback()]
            steps += [decoders.Fuse(), *([decoders.Strip(" ", 1, 0)] if strip else [])]
            self._tok.decoder = decoders.Sequence(steps)
        present = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        for token in (*dict(sorted(config.added.items())).values(), *config.named.values(),
                      *config.extra):  # fmt: skip
            if token.content not in present:
                self._tok.add_tokens([tokenizers.AddedToken(**token._asdict())])
                present.add(token.content)
        # CLIPTokenizer decodes its "</w>" word ends to spaces (a patch of transformers' own)
        model = self._tok.model
        self._word_end = model.end_of_word_suffix if config.kind == "CLIPTokenizer" else ""
        # transformers 5 skips the clean-up for BPE models (it would eat real spaces)
        self._clean = bool(config.options.get("clean_up_tokenization_spaces")) and (
            type(model).__name__ != "BPE"
        )
        self.named = {k: self._tok.token_to_id(t.content) for k, t in config.named.items()}

    @property
    def size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def frame(self, text: str, max_len: int) -> list[int]:
        encoding = self._tok.encode(text, add_special_tokens=False)
        encoding.truncate(_room(self._tok.num_special_tokens_to_add(False), max_len))
        return self._tok.post_process(encoding).ids

    def decode(self, ids: list[int]) -> str:
        text = self._tok.decode(ids, skip_special_tokens=True)
        text = text.replace(self._word_end, " ").strip() if self._word_end else text
        return _clean_up(text) if self._clean else text

    def pieces(self) -> tuple[str, ...]:
        return tuple(self._tok.id_to_token(i) or "" for i in range(self.size))


def _fallback_text(byte_run: bytearray) -> str:
    """A run of byte pieces as text: UTF-8, or one U+FFFD per byte (tokenizers' ByteFallback)."""
    try:
        return byte_run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(byte_run)


class _SentencePieceVocabulary:
    """A directory's SentencePiece model alone, encoded as transformers 5 encodes it: Llama and
    Gemma as the tokenizers model it converts them to (added tokens and control pieces split
    out, spaces as "▁", Llama's prefix by `_llama_prefix`), SigLIP as its SiglipTokenizer (lower
    case, no punctuation, <eos> appended), other classes as SentencePiece itself."""

    def __init__(self, file: epath.Path, config: _HFConfig) -> None:
        options = config.options
        self._kind = config.kind
        self._scheme, self._strip = "never", False
        proto = file.read_bytes()
        if config.kind in _CONVERTED:
            if config.kind == "LlamaTokenizer":
                self._scheme, self._strip = _llama_prefix(options)
            proto += _NO_DUMMY_PREFIX + _KEEP_WHITESPACE
        elif config.kind == "SiglipTokenizer" and not options.get("legacy", True):
            proto += _NO_DUMMY_PREFIX
        self._sp = sp = load_sentencepiece(proto, str(file))
        base = sp.get_piece_size()
        named = dict(config.named)
        tokens: list[tuple[int | None, _Added]] = []
        if config.kind == "SiglipTokenizer":
            self._unk = named["unk_token"].content
            self._unk_len = len(sp.encode(self._unk))
            self._lower = options.get("do_lower_case", True)
        else:  # control pieces are special tokens in the model transformers 5 converts to
            tokens += [(i, _Added(sp.id_to_piece(i))) for i in range(base) if sp.is_control(i)]
        if config.kind not in _CLASS_SPECIALS:  # as its generic tokenizer, the proto's specials
            for key, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                           ("unk_token", sp.unk_id())):  # fmt: skip
                if i >= 0:
                    named.setdefault(key, _Added(sp.id_to_piece(i)))
        tokens += sorted(config.added.items())
        tokens += [(None, t) for t in (*named.values(), *config.extra)]
        self._added: dict[str, tuple[int, _Added]] = {}
        size = base
        for fixed, token in tokens:
            if token.content in self._added:
                continue
            i = sp.piece_to_id(token.content)
            if sp.id_to_piece(i) != token.content:
                i = fixed if fixed is not None and fixed >= base else size
            self._added[token.content] = (i, token)
            size = max(size, i + 1)
        self.size = size
        self._texts = {i: content for content, (i, _) in self._added.items()}
        self._special = {i for i, token in self._added.values() if token.special}
        longest_first = sorted(self._added, key=len, reverse=True)
        self._split_at = (
            re.compile("|".join(map(re.escape, longest_first))) if self._added else None
        )
        self.named = {k: self._added[t.content][0] for k, t in named.items()}
        self._add_bos = bool(options.get("add_bos_token")) and "bos_token" in named
        self._add_eos = bool(options.get("add_eos_token")) and "eos_token" in named
        self._clean = bool(options.get("clean_up_tokenization_spaces"))

    def _chunks(self, text: str) -> list[tuple[str, int | None, int]]:
        """(text, None, start) between added tokens and (token, id, start) for each of them,
        their lstrip/rstrip eating the whitespace beside them."""
        chunks: list[tuple[str, int | None, int]] = []
        start = 0
        while self._split_at and (match := self._split_at.search(text, start)):
            i, token = self._added[match[0]]
            left = text[start : match.start()]
            chunks += [(left.rstrip() if token.lstrip else left, None, start)]
            chunks += [(match[0], i, match.start())]
            start = match.end()
            if token.rstrip:
                start = len(text) - len(text[start:].lstrip())
        return [*chunks, (text[start:], None, start)]

    def encode(self, text: str) -> list[int]:
        if self._kind == "SiglipTokenizer":
            return self._siglip_encode(text)
        ids: list[int] = []
        for chunk, i, start in self._chunks(text):
            if i is not None:
                ids.append(i)
            elif chunk and self._kind in _CONVERTED:
                chunk = chunk.replace(" ", SPIECE_UNDERLINE)
                first = self._scheme == "always" or (self._scheme == "first" and start == 0)
                if first and not chunk.startswith(SPIECE_UNDERLINE):
                    chunk = SPIECE_UNDERLINE + chunk
                ids += self._sp.encode(chunk)
            elif chunk:
                ids += self._sp.encode(chunk)
        return ids

    def _siglip_encode(self, text: str) -> list[int]:
        """SiglipTokenizer.tokenize: "▁" before the text; each chunk lower-cased (do_lower_case),
        without ASCII punctuation and runs of whitespace, encoded after its unk token."""
        tokens: list[tuple[str, int]] = []  # (token as transformers sees it, id)
        for chunk, i, _ in self._chunks(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")):
            if i is not None:
                tokens.append((chunk, i))
            elif chunk:
                chunk = chunk.lower() if self._lower else chunk
                chunk = re.sub(r"\s+", " ", chunk.translate(_PUNCTUATION)).strip()
                pieces = self._sp.encode(self._unk + chunk, out_type=str)
                pieces = pieces[self._unk_len :] if len(pieces) >= self._unk_len else pieces
                tokens += [(p, self._sp.piece_to_id(p)) for p in pieces]
        # a lone "▁" before a special token goes (an unknown character's token is its text)
        if len(tokens) > 1 and tokens[0][0] == SPIECE_UNDERLINE and tokens[1][0] in self._added:
            tokens = tokens[1:] if self._added[tokens[1][0]][1].special else tokens
        return [i for _, i in tokens]

    def frame(self, text: str, max_len: int) -> list[int]:
        ids = self.encode(text)
        eos = self.named.get("eos_token")
        if self._kind == "SiglipTokenizer":  # appends <eos> unless the text ends with it
            ids = ids[: _room(1, max_len)]
            return ids if ids and ids[-1] == eos else [*ids, eos]
        ids = ids[: _room(self._add_bos + self._add_eos, max_len)]
        bos = [self.named["bos_token"]] if self._add_bos else []
        return [*bos, *ids, *([eos] if self._add_eos else [])]

    def _piece(self, i: int) -> str:
        return self._texts.get(i) or (
            self._sp.id_to_piece(i) if i < self._sp.get_piece_size() else ""
        )

    def decode(self, ids: list[int]) -> str:
        pieces = [self._piece(i) for i in ids if i not in self._special]
        if self._kind not in _CONVERTED:
            text = self._sp.decode_pieces(pieces)
            text = text.strip() if self._kind == "SiglipTokenizer" else text
            return _clean_up(text) if self._clean else text
        out, byte_run = [], bytearray()  # tokenizers' Replace("▁", " "), ByteFallback, Fuse
        for piece in pieces:
            if byte := _BYTE_PIECE.fullmatch(piece):
                byte_run.append(int(byte[1], 16))
                continue
            if byte_run:
                out.append(_fallback_text(byte_run))
                byte_run = bytearray()
            out.append(piece.replace(SPIECE_UNDERLINE, " "))
        text = "".join([*out, _fallback_text(byte_run) if byte_run else ""])
        return text[1:] if self._strip and text.startswith(" ") else text

    def pieces(self) -> tuple[str, ...]:
        return tuple(self._piece(i) for i in range(self.size))


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory read without transformers: the vocabulary of imported
    weights.

    tokenizer.json goes through the `tokenizers` library; a directory with only a SentencePiece
    model (SigLIP's spiece.model, Vicuna's tokenizer.model) through `sentencepiece`. Special and
    added tokens and the framing come from tokenizer_config.json (special_tokens_map.json,
    added_tokens.json in older checkpoints) and the tokenizer.json post-processor, resolved as
    transformers 5 resolves them. `encode` adds no specials (a special token's text in the input
    gives its id); `tokenize` frames as the checkpoint was trained (its bos/eos, the text cut to
    fit) and pads on the right with its pad token (id 0 if it has none); `decode` stops at the
    first eos and drops every special token (transformers' skip_special_tokens=True).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        directory = epath.Path(path)
        if not directory.is_dir():
            raise UserError(
                f"data.tokenizer_path {path!r} is not a directory: data.tokenizer=hf reads a "
                "Hugging Face tokenizer directory"
            )
        config = _HFConfig.read(directory)
        models = [directory / name for name in _HF_SENTENCEPIECE if (directory / name).exists()]
        if (directory / _HF_JSON).exists():
            self._vocab: _JsonVocabulary | _SentencePieceVocabulary = _JsonVocabulary(
                directory / _HF_JSON, config
            )
        elif models:
            self._vocab = _SentencePieceVocabulary(models[0], config)
        else:
            raise UserError(
                f"{path!r} holds no {_HF_JSON}, {' or '.join(_HF_SENTENCEPIECE)} (a directory "
                "with vocab.json and merges.txt only: save it once with transformers' "
                "save_pretrained to write tokenizer.json)"
            )
        named = {k: i for k, i in self._vocab.named.items() if i is not None}
        self.pad_id = named.get("pad_token", 0)
        self.bos_id = named.get("bos_token", -1)
        self.eos_id = named.get("eos_token", -1)

    @property
    def vocab_size(self) -> int:
        """All ids, added tokens included (len() of the transformers tokenizer)."""
        return self._vocab.size

    def encode(self, text: str) -> list[int]:
        return self._vocab.encode(text)

    def _decode_ids(self, ids: list[int]) -> str:
        return self._vocab.decode(ids)

    def pieces(self) -> tuple[str, ...]:
        return self._vocab.pieces()

    def tokenize(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """int32 [N, max_len]: each text framed as transformers frames it with truncation to
        max_len, right-padded with pad_id."""
        out = np.full((len(texts), max_len), self.pad_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = self._vocab.frame(text, max_len)
            out[row, : len(ids)] = ids
        return out

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"
