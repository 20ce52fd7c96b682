"""Existing tokenizers: Hugging Face tokenizer directories read without transformers
(`HFTokenizer`) and SentencePiece .model files (data.tokenizer_path) encode, frame and decode
exactly as transformers 5, the reference, does.

The checkpoints are built here: tiny SentencePiece models shaped like Llama's, Gemma's (BPE,
byte fallback) and SigLIP's (unigram), a byte-level BPE like Qwen2's and a CLIP BPE, wrapped in
their transformers classes and saved as checkpoint directories are (tokenizer.json), or left as
the model file with a tokenizer_config.json (Vicuna's and SigLIP's hub layout).

Decoding: mmjax's `decode` stops at the first eos and drops every special token, i.e.
transformers' `decode(ids[:first eos], skip_special_tokens=True)`.
"""

import io
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmjax.data import data_config, load_or_train_tokenizer
from mmjax.data.hf_tokenizer import HFTokenizer
from mmjax.data.tokenizer import SentencePieceTokenizer
from mmjax.errors import UserError

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers", minversion="5")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Numbers 12345 and 2024, a photo of a cat",
    "Ünïcödé façade, naïve café and émojis 🙂",
    "Multiple   spaces\nand newlines\tand tabs",
    "Japanese 日本語のテキスト and more text",
    "lorem ipsum dolor sit amet, consectetur adipiscing elit",
    "It's five o'clock, isn't it? UPPER lower Mixed",
] * 4
STRINGS = (
    "Hello world",
    "a photo of a cat.",
    " leading space",
    "trailing space ",
    "  two  spaces  ",
    "line one\nline two\n\n",
    "\ttab",
    "digits 0123456789 and 3.14",
    "Ünïcödé façade naïve",
    "日本語のテキスト",
    "emoji 🙂👍🏽",
    "",
    " ",
    "\n",
    "It's 5 o'clock, isn't it?",
    "UPPER lower",
    "▁underline",
    "x  \n  y",
)
CHARS = list("abcXYZ 019\n\t.,'!?-éñ日本🙂▁")
QWEN_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CLIP_REGEX = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
    r"|[^\s\p{L}\p{N}]+"
)


def train_sentencepiece(**options: object) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=420,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    return model.getvalue()


LLAMA_SPM = dict(  # Llama's: BPE, byte fallback, raw text, a dummy "▁" prefix, no pad
    model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
    remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
    allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
)  # fmt: skip
GEMMA_SPM = dict(  # Gemma's: no dummy prefix, <pad> <eos> <bos> <unk>, user-defined turn markers
    LLAMA_SPM, add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
    pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
    user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
)  # fmt: skip
SIGLIP_SPM = dict(model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)  # T5's ids


def model_dir(path: Path, file: str, proto: bytes, config: dict) -> Path:
    """A hub-style directory holding only a SentencePiece model and its tokenizer_config."""
    path.mkdir()
    (path / file).write_bytes(proto)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def saved(tokenizer, path: Path) -> Path:
    tokenizer.save_pretrained(path)
    assert (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists()
    return path


def byte_level_bpe(regex: str, specials: list[str], **bpe: object) -> tuple[dict, list]:
    """(vocab, merges) of a small BPE trained on the corpus's bytes."""
    from tokenizers import Regex, models, normalizers, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(**bpe))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )  # fmt: skip
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **bpe,
    )  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def word_level(path: Path) -> Path:
    """A word-level tokenizer.json with a template post-processor, as test_convert's CLIP has,
    decoding with transformers' clean-up of spaces before punctuation."""
    from tokenizers import models, pre_tokenizers, processors

    words = sorted({w for text in CORPUS for w in re.findall(r"\w+|[^\w\s]+", text)})
    vocab = {"[PAD]": 0, "[UNK]": 1, "<s>": 2, "</s>": 3} | {w: i + 4 for i, w in enumerate(words)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
        unk_token="[UNK]", clean_up_tokenization_spaces=True,
    )  # fmt: skip
    return saved(fast, path)


def legacy_llama_json(source: Path, path: Path, legacy: bool) -> Path:
    """A Llama tokenizer.json as transformers 4 wrote it (the "▁" prefix in a normalizer), which
    transformers 5 rebuilds by its `legacy` flag."""
    shutil.copytree(source, path)
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ]}  # fmt: skip
    spec["pre_tokenizer"] = None
    (path / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": legacy}))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer directories by name: "<family>-model" holds a SentencePiece model only,
    "<family>-json" a tokenizer.json written by transformers."""
    root = tmp_path_factory.mktemp("checkpoints")
    llama_config = dict(
        tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False,
        legacy=False, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )  # fmt: skip
    gemma_config = dict(
        tokenizer_class="GemmaTokenizer", add_bos_token=True, add_eos_token=False,
        bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
    )  # fmt: skip
    siglip_config = dict(
        tokenizer_class="SiglipTokenizer", eos_token="</s>", pad_token="</s>",
        unk_token="<unk>", model_max_length=64, do_lower_case=True,
    )  # fmt: skip
    out = {
        "llama-model": model_dir(
            root / "llama-model", "tokenizer.model", train_sentencepiece(**LLAMA_SPM),
            llama_config,
        ),
        "gemma-model": model_dir(
            root / "gemma-model", "tokenizer.model", train_sentencepiece(**GEMMA_SPM),
            gemma_config,
        ),
        "siglip-model": model_dir(
            root / "siglip-model", "spiece.model", train_sentencepiece(**SIGLIP_SPM),
            siglip_config,
        ),
    }  # fmt: skip
    out["llama-model-legacy"] = model_dir(
        root / "llama-model-legacy", "tokenizer.model",
        (out["llama-model"] / "tokenizer.model").read_bytes(), {**llama_config, "legacy": True},
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llama = transformers.LlamaTokenizerFast.from_pretrained(out["llama-model"])
        out["llama-json"] = saved(llama, root / "llama-json")
        gemma = transformers.GemmaTokenizerFast.from_pretrained(out["gemma-model"])
        out["gemma-json"] = saved(gemma, root / "gemma-json")
        vocab, merges = byte_level_bpe(QWEN_REGEX, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        qwen = transformers.Qwen2TokenizerFast(
            vocab=vocab, merges=merges, extra_special_tokens=["<|im_start|>", "<|im_end|>"]
        )
        out["qwen2-json"] = saved(qwen, root / "qwen2-json")
        specials = ["<|startoftext|>", "<|endoftext|>"]
        vocab, merges = byte_level_bpe(CLIP_REGEX, specials, end_of_word_suffix="</w>")
        out["clip-json"] = saved(transformers.CLIPTokenizerFast(vocab, merges), root / "clip-json")
        out["words-json"] = word_level(root / "words-json")
    for legacy in (False, True):
        name = f"llama-json-v4{'-legacy' * legacy}"
        out[name] = legacy_llama_json(out["llama-json"], root / name, legacy)
    return out


@pytest.fixture(scope="module")
def references(checkpoints) -> dict[str, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            name: transformers.AutoTokenizer.from_pretrained(d) for name, d in checkpoints.items()
        }


HF_CHECKPOINTS = [
    "llama-model", "llama-model-legacy", "gemma-model", "siglip-model", "llama-json",
    "llama-json-v4", "llama-json-v4-legacy", "gemma-json", "qwen2-json", "clip-json",
    "words-json",
]  # fmt: skip


def special_texts(reference) -> list[str]:
    """Texts naming the reference's special and added tokens."""
    tokens = sorted({*reference.all_special_tokens, *map(str, reference.get_added_vocab())})
    return [s for t in tokens for s in (t, f"x {t} y", f"{t}hi{t}", f" {t}\n")]


def assert_like_reference(ours, reference, text: str, max_lens: tuple[int, ...] = (3, 8, 64)):
    ids = reference.encode(text, add_special_tokens=False)
    assert ours.encode(text) == ids, text
    for max_len in max_lens:  # framed and cut as the checkpoint frames
        framed = reference(text, truncation=True, max_length=max_len)["input_ids"]
        row = ours.tokenize([text], max_len)[0].tolist()
        assert row == framed + [ours.pad_id] * (max_len - len(framed)), (text, max_len)
    for seq in (ids, framed):
        cut = seq.index(ours.eos_id) if ours.eos_id in seq else len(seq)
        expected = reference.decode(seq[:cut], skip_special_tokens=True)
        assert ours.decode(seq) == expected, (text, seq)


@pytest.mark.parametrize("name", HF_CHECKPOINTS)
def test_hf_tokenizer_matches_transformers(checkpoints, references, name):
    reference, ours = references[name], HFTokenizer(str(checkpoints[name]))
    assert ours.vocab_size == len(reference)
    assert ours.pieces() == tuple(reference.convert_ids_to_tokens(list(range(len(reference)))))
    for got, ref_id, missing in (
        (ours.bos_id, reference.bos_token_id, -1),
        (ours.eos_id, reference.eos_token_id, -1),
        (ours.pad_id, reference.pad_token_id, 0),
    ):
        assert got == (missing if ref_id is None else ref_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SiglipTokenizer warns on a text ending with </s>
        for text in (*STRINGS, *special_texts(reference)):
            assert_like_reference(ours, reference, text)


def test_the_checkpoints_frame_as_their_architectures(checkpoints):
    """Llama and Gemma add bos only, SigLIP appends eos, Qwen2 adds nothing, CLIP both."""
    expected = {
        "llama-model": ("bos",), "llama-json": ("bos",), "gemma-model": ("bos",),
        "gemma-json": ("bos",), "siglip-model": ("eos",), "qwen2-json": (),
        "clip-json": ("bos", "eos"), "words-json": ("bos", "eos"),
    }  # fmt: skip
    for name, framing in expected.items():
        tok = HFTokenizer(str(checkpoints[name]))
        ids = tok.encode("a cat")
        want = [tok.bos_id] * ("bos" in framing) + ids + [tok.eos_id] * ("eos" in framing)
        row = tok.tokenize(["a cat"], 16)[0].tolist()
        assert row == want + [tok.pad_id] * (16 - len(want)), name


TEXTS = st.lists(st.sampled_from(CHARS), max_size=24).map("".join)


@pytest.mark.parametrize("name", ["llama-model", "gemma-model", "siglip-model", "llama-json",
                                  "qwen2-json", "clip-json"])  # fmt: skip
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_text_encodes_and_decodes_like_transformers(checkpoints, references, name, data):
    reference = references[name]
    specials = special_texts(reference)[::4]  # the bare token texts
    pieces = st.lists(st.one_of(TEXTS, st.sampled_from(specials)), max_size=4)
    text = data.draw(pieces.map("".join))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_like_reference(HFTokenizer(str(checkpoints[name])), reference, text, (8,))


# ------------------------------------------------------------------------ data.tokenizer_path


def sentencepiece_config(path: object) -> object:
    return data_config(tokenizer="sentencepiece", tokenizer_path=str(path))


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_a_sentencepiece_model_file_is_loaded_not_trained(checkpoints, references, tmp_path,
                                                           family):  # fmt: skip
    """data.tokenizer=sentencepiece + tokenizer_path: the file as SentencePiece encodes it,
    which is transformers' Gemma; transformers' Llama differs only where the text starts with
    whitespace or "▁" (its Metaspace adds no "▁" before one), so those are left out for Llama."""
    model = checkpoints[f"{family}-model"] / "tokenizer.model"
    tok = load_or_train_tokenizer(sentencepiece_config(model), str(tmp_path / "run"), write=True)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.model_proto == model.read_bytes() and not (tmp_path / "run").exists()
    reference = references[f"{family}-model"]
    assert (tok.bos_id, tok.eos_id) == (reference.bos_token_id, reference.eos_token_id)
    assert tok.pad_id == 0 and tok.vocab_size == spm.SentencePieceProcessor(str(model)).vocab_size()
    for text in STRINGS:
        if family == "llama" and text[:1] in (" ", "\t", "\n", "▁"):
            continue
        ids = reference.encode(text, add_special_tokens=False)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
    row = tok.tokenize(["a cat"], 12)[0].tolist()
    framed = [tok.bos_id, *tok.encode("a cat"), tok.eos_id]
    assert row == framed + [0] * (12 - len(framed))


def test_a_vocabulary_without_bos_frames_text_and_eos(checkpoints):
    """T5 and big_vision vocabularies (pad 0, eos 1, no bos): ids + [eos], padded with 0."""
    model = checkpoints["siglip-model"] / "spiece.model"
    tok = load_or_train_tokenizer(sentencepiece_config(model), None, write=False)
    sp = spm.SentencePieceProcessor(str(model))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, -1, 1)
    assert tok.encode("A photo of a cat") == sp.encode("A photo of a cat")
    row = tok.tokenize(["A photo of a cat"], 32)[0].tolist()
    framed = [*sp.encode("A photo of a cat"), 1]
    assert row == framed + [0] * (32 - len(framed))
    assert tok.decode(row) == sp.decode(sp.encode("A photo of a cat"))


@settings(max_examples=60, deadline=None)
@given(text=TEXTS)
def test_a_sentencepiece_model_file_round_trips_like_gemma(checkpoints, references, text):
    tok = SentencePieceTokenizer((checkpoints["gemma-model"] / "tokenizer.model").read_bytes())
    reference = references["gemma-model"]
    ids = reference.encode(text, add_special_tokens=False)
    assert tok.encode(text) == ids
    assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids) == text.replace("▁", " ")


# ------------------------------------------------------------------------ errors


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "tokenizer, make, match",
    [
        ("sentencepiece", lambda d: d / "missing.model", "is not a file"),
        ("sentencepiece", lambda d: d, "is not a file"),
        ("sentencepiece", lambda d: write(d / "x.model", b"\x00garbage"), "not a sentencepiece"),
        ("sentencepiece", lambda d: write(d / "x.model", b""), "holds no pieces"),
        ("hf", lambda d: d / "missing", "is not a directory"),
        ("hf", lambda d: write(d / "tokenizer_config.json", b"{}").parent, "holds no tokenizer"),
        ("hf", lambda d: write(d / "tokenizer.json", b"{not json").parent, "cannot read"),
        ("hf", lambda d: write(d / "tokenizer.model", b"\x00garbage").parent, "not a sentencep"),
        ("hf", lambda d: write(d / "tokenizer_config.json", b"{,").parent, "cannot read"),
    ],
)
def test_a_missing_or_broken_tokenizer_is_one_clear_line(tmp_path, tokenizer, make, match):
    path = make(tmp_path / "t")
    if tokenizer == "sentencepiece" and path == tmp_path / "t":
        path.mkdir()
    cfg = data_config(tokenizer=tokenizer, tokenizer_path=str(path))
    with pytest.raises(UserError, match=match) as error:
        load_or_train_tokenizer(cfg, None, write=False)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_reading_a_checkpoint_imports_neither_transformers_nor_torch(checkpoints):
    script = (
        "import sys; from mmjax.data.hf_tokenizer import HFTokenizer\n"
        f"for d in {[str(checkpoints[n]) for n in ('llama-model', 'siglip-model', 'qwen2-json')]}:"
        "\n    HFTokenizer(d).tokenize(['a cat'], 8)\n"
        "assert not {'transformers', 'torch'} & set(sys.modules), 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
