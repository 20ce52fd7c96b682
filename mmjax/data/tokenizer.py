"""Text tokenizers: SentencePiece (trained on the training captions or loaded from a .model
file), raw bytes, and Hugging Face tokenizer directories (data/hf_tokenizer.py).

They share the special ids convention the models rely on: pad = 0 (masked out), then bos and
eos; `tokenize` frames every text as [bos] + ids + [eos] and pads to a fixed length (an HF
tokenizer frames as its checkpoint does).
`WithSpecialTokens` appends single-id specials after any base vocabulary: Transfusion's
<BOI>/<EOI>, and the VLM sequences' <image>, <ref></ref><box></box> and task identifiers.
"""

import io
import re
from collections.abc import Callable, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath
from ml_collections import ConfigDict

from mmjax.data.hf_tokenizer import HFTokenizer
from mmjax.data.sources import Source, build_source, sample_captions
from mmjax.data.tokenizer_base import Tokenizer, load_sentencepiece
from mmjax.data.vlm_tasks import IMAGE_TOKEN, SPECIAL_TOKENS
from mmjax.errors import UserError

TOKENIZER_FILE = "tokenizer.model"
TOKENIZERS = ("sentencepiece", "byte", "hf")
# Enough text to fit a small vocabulary; bounds the read of a large dataset.
_MAX_TRAINING_CAPTIONS = 100_000


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, used as SentencePiece itself encodes (as Gemma and big_vision do).

    Trained here: pad = 0, unk = 1, bos = 2, eos = 3. Loaded (Gemma, T5, big_vision, Llama
    vocabularies): its eos; its bos if any (T5 has none); its pad if any, which must be id 0, else
    id 0 pads (Llama's <unk>, as LLaVA pads).
    """

    def __init__(self, model_proto: bytes, name: str = TOKENIZER_FILE) -> None:
        self.model_proto = model_proto
        self._sp = load_sentencepiece(model_proto, name)
        if self._sp.pad_id() > 0 or self._sp.eos_id() < 0:
            raise UserError(
                f"sentencepiece model {name} must define an eos piece and a pad of id 0 or none "
                f"(pad {self._sp.pad_id()}, eos {self._sp.eos_id()})"
            )
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()

    @classmethod
    def train(
        cls, texts: Sequence[str], vocab_size: int, *, split_digits: bool = False
    ) -> "SentencePieceTokenizer":
        """Trains a BPE model on `texts`, deterministically (one thread, fixed order).

        `hard_vocab_limit=False` makes `vocab_size` an upper bound, so tiny corpora still train;
        `split_digits` makes every digit its own piece (numbers spelled digit by digit).
        """
        sentences = [t.replace("\n", " ") for t in texts if t.strip()]
        if not sentences:
            raise UserError("cannot train a sentencepiece tokenizer: the captions are all empty")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            hard_vocab_limit=False,
            character_coverage=1.0,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            split_digits=split_digits,
            num_threads=1,
            minloglevel=2,
        )
        return cls(model.getvalue())

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _decode_ids(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def pieces(self) -> tuple[str, ...]:
        return tuple(self._sp.id_to_piece(i) for i in range(self.vocab_size))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes shifted past the specials: pad = 0, bos = 1, eos = 2, byte b -> b + 3."""

    bos_id = 1
    eos_id = 2
    _OFFSET = 3

    @property
    def vocab_size(self) -> int:
        return 256 + self._OFFSET

    def encode(self, text: str) -> list[int]:
        return [b + self._OFFSET for b in text.encode("utf-8")]

    def _decode_ids(self, ids: list[int]) -> str:
        data = bytes(i - self._OFFSET for i in ids if self._OFFSET <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def pieces(self) -> tuple[str, ...]:
        return ("<pad>", "<bos>", "<eos>", *(f"<0x{b:02X}>" for b in range(256)))

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SizedTokenizer(ByteTokenizer):
    """A vocabulary of the size a config asks for, ids made from bytes (folded into it):
    every shape a model and its batches take, without the data a SentencePiece model is
    trained on or the checkpoint an hf tokenizer is read from (ahead-of-time compiles)."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size <= self._OFFSET:
            raise UserError(f"data.vocab_size must exceed {self._OFFSET}, got {vocab_size}")
        self._size = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._size

    def encode(self, text: str) -> list[int]:
        span = self._size - self._OFFSET
        return [b % span + self._OFFSET for b in text.encode("utf-8")]

    def __repr__(self) -> str:
        return f"SizedTokenizer({self._size})"


class WithSpecialTokens(Tokenizer):
    """A tokenizer plus special tokens after its vocabulary, one id each.

    `encode` maps each special's text inside a string (e.g. "<ref>") to its id and the text
    between specials through the base; `decode` writes the specials back as their text.
    """

    def __init__(self, base: Tokenizer, specials: Sequence[str], *, reuse: bool = False) -> None:
        """`reuse`: a special the base already encodes as one token keeps that id (a
        checkpoint's tokenizer that has it, e.g. Qwen2-VL's <|image_pad|>); the others get
        new ids after the vocabulary."""
        if len(set(specials)) != len(specials) or not all(specials):
            raise ValueError(f"special tokens must be distinct and non-empty, got {specials}")
        self.base = base
        self.pad_id, self.bos_id, self.eos_id = base.pad_id, base.bos_id, base.eos_id
        self.special_ids = {}
        for text in specials:
            known = base.encode(text) if reuse else []
            fresh = base.vocab_size + sum(i >= base.vocab_size for i in self.special_ids.values())
            self.special_ids[text] = known[0] if len(known) == 1 else fresh
        self._special_texts = {i: text for text, i in self.special_ids.items()}
        longest_first = sorted(specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size + sum(
            i >= self.base.vocab_size for i in self.special_ids.values()
        )

    def encode(self, text: str) -> list[int]:
        ids = []
        for part in self._split.split(text):
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            elif part:
                ids += self.base.encode(part)
        return ids

    def _decode_ids(self, ids: list[int]) -> str:
        pieces, run = [], []
        for i in ids:
            if i in self._special_texts:
                pieces += [self.base._decode_ids(run), self._special_texts[i]]
                run = []
            elif i < self.base.vocab_size:
                run.append(i)
        return "".join([*pieces, self.base._decode_ids(run)])

    def pieces(self) -> tuple[str, ...]:
        return (*self.base.pieces(), *self.special_ids)

    def tokenize(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """Framed as the base frames text (HF checkpoints keep their own specials)."""
        return self.base.tokenize(texts, max_len)

    def __repr__(self) -> str:
        return f"WithSpecialTokens({self.base!r}, {tuple(self.special_ids)})"


class WithImageMarkers(WithSpecialTokens):
    """A tokenizer plus <BOI> and <EOI>, the brackets of an image inside a mixed-modal
    sequence (Transfusion Sec. 2.2)."""

    def __init__(self, base: Tokenizer) -> None:
        super().__init__(base, ("<BOI>", "<EOI>"))
        self.boi_id, self.eoi_id = self.special_ids["<BOI>"], self.special_ids["<EOI>"]

    def __repr__(self) -> str:
        return f"WithImageMarkers({self.base!r})"


class WithVlmTokens(WithSpecialTokens):
    """A tokenizer plus the specials of VLM sequences (`vlm_tasks.SPECIAL_TOKENS`): the
    <image> placeholder, Qwen-VL's <ref></ref><box></box> and MiniGPT-v2's task identifiers."""

    def __init__(self, base: Tokenizer) -> None:
        super().__init__(base, SPECIAL_TOKENS)
        self.image_id = self.special_ids[IMAGE_TOKEN]

    def __repr__(self) -> str:
        return f"WithVlmTokens({self.base!r})"


TrainingTexts = Callable[[Source, str], list[str]]  # (train split, data.source) -> texts


def sized_base_tokenizer(data_cfg: ConfigDict) -> Tokenizer:
    """A tokenizer with the vocabulary size `base_tokenizer` would give, read from the config
    alone: data.vocab_size for SentencePiece and hf tokenizers (for hf, the checkpoint
    tokenizer's size), bytes for "byte"."""
    return ByteTokenizer() if data_cfg.tokenizer == "byte" else SizedTokenizer(data_cfg.vocab_size)


def _train_sentencepiece(
    data_cfg: ConfigDict, texts: TrainingTexts | None, split_digits: bool
) -> "SentencePieceTokenizer":
    """A SentencePiece model of `texts` of the train split (default: its captions); with
    `split_digits` each digit is its own token (box coordinates)."""
    source = build_source(data_cfg, data_cfg.split_train)
    corpus = (
        texts(source, data_cfg.source)
        if texts is not None
        else sample_captions(source, _MAX_TRAINING_CAPTIONS)
    )
    return SentencePieceTokenizer.train(corpus, int(data_cfg.vocab_size), split_digits=split_digits)


def base_tokenizer(
    data_cfg: ConfigDict,
    workdir: str | None,
    *,
    write: bool,
    texts: TrainingTexts | None = None,
    split_digits: bool = False,
) -> Tokenizer:
    """The tokenizer named by `data_cfg.tokenizer`, without the specials of a sequence kind
    (data/kinds.py adds them).

    SentencePiece: the model file `data_cfg.tokenizer_path` when set (Gemma, T5, big_vision
    vocabularies); else `workdir/tokenizer.model` when present (so a resumed run keeps its
    vocabulary), else one trained on the train split's `texts` (default: its captions).
    Training is deterministic, so every process trains the same model; only the caller with
    `write` (process 0) saves it.
    """
    kind = data_cfg.tokenizer
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        if not data_cfg.get("tokenizer_path"):
            raise UserError("data.tokenizer=hf needs data.tokenizer_path (a local directory)")
        return HFTokenizer(data_cfg.tokenizer_path)
    if kind != "sentencepiece":
        raise UserError(f"unknown data.tokenizer '{kind}' (valid: {', '.join(TOKENIZERS)})")
    if data_cfg.get("tokenizer_path"):
        model = epath.Path(data_cfg.tokenizer_path)
        if not model.is_file():
            raise UserError(
                f"data.tokenizer_path {data_cfg.tokenizer_path!r} is not a file: "
                "data.tokenizer=sentencepiece loads a SentencePiece .model file"
            )
        return SentencePieceTokenizer(model.read_bytes(), data_cfg.tokenizer_path)
    path = epath.Path(workdir) / TOKENIZER_FILE if workdir else None
    if path is not None and path.exists():
        return SentencePieceTokenizer(path.read_bytes(), str(path))
    tokenizer = _train_sentencepiece(data_cfg, texts, split_digits)
    if write and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{TOKENIZER_FILE}.tmp"
        tmp.write_bytes(tokenizer.model_proto)
        tmp.rename(path)
    return tokenizer
