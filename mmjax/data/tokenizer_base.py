"""The tokenizer contract every mmjax tokenizer implements (`Tokenizer`: ids of the specials,
encode, decode, fixed-length framing) and the SentencePiece loading that the trained, loaded and
Hugging Face tokenizers share."""

import abc
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm

from mmjax.errors import UserError

SPIECE_UNDERLINE = "▁"  # SentencePiece's space


class Tokenizer(abc.ABC):
    """Maps text to ids and back; subclasses provide the ids of the specials."""

    pad_id: int = 0
    bos_id: int
    eos_id: int

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, specials included (the embedding table size)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without specials."""

    @abc.abstractmethod
    def _decode_ids(self, ids: list[int]) -> str:
        """Text of `ids`, which hold no specials."""

    @abc.abstractmethod
    def pieces(self) -> tuple[str, ...]:
        """Every id's piece, in id order: equal pieces, equal ids for every text."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`: stops at the first eos and skips pad and bos."""
        kept = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                kept.append(i)
        return self._decode_ids(kept)

    def tokenize(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """int32 [N, max_len]: [bos] + ids + [eos] + pads (no bos where the vocabulary has none,
        as T5's); long texts are cut before the eos."""
        if max_len < 2:
            raise UserError(f"data.max_text_len must be at least 2 (bos + eos), got {max_len}")
        head = [self.bos_id] if self.bos_id >= 0 else []
        out = np.full((len(texts), max_len), self.pad_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = [*head, *self.encode(text)[: max_len - 1 - len(head)], self.eos_id]
            out[row, : len(ids)] = ids
        return out


def one_line(error: BaseException) -> str:
    """An error's text on one line (SentencePiece's and tokenizers' span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def load_sentencepiece(model_proto: bytes, name: str) -> spm.SentencePieceProcessor:
    """The processor of `model_proto`; a UserError naming `name` if it is no model."""
    try:
        sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError as e:
        raise UserError(f"{name} is not a sentencepiece model: {one_line(e)}") from None
    if sp.get_piece_size() == 0:
        raise UserError(f"{name} is not a sentencepiece model: it holds no pieces")
    return sp
