"""A VLM preset starting from an imported LLM (`init_from.format=hf_llm`): the checkpoint's
architecture and tokenizer become the run's, its weights fill `lm/` (rows added for the VLM's
special tokens), and with the LM frozen two training steps leave it bit-identical while the
connector trains. Bad input (a model without an LM, a tokenizer of another vocabulary) is one
clear line, before anything is written."""

import json
import os

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from helpers import REPO

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")

from mmjax import convert  # noqa: E402
from mmjax.errors import UserError  # noqa: E402
from mmjax.export import export  # noqa: E402
from mmjax.train import train_and_evaluate  # noqa: E402
from mmjax.train.build import build, load_trained  # noqa: E402
from mmjax.train.config_cli import load_config  # noqa: E402

LLAMA_TOKENIZER = dict(
    tokenizer_class="LlamaTokenizer",
    add_bos_token=True,
    add_eos_token=False,
    legacy=False,
    bos_token="<s>",
    eos_token="</s>",
    unk_token="<unk>",
)
TEXTS = [
    "a red circle and a blue square on the left",
    "what colour is the circle? green",
    "find the small yellow triangle at the top right",
    "0 1 2 3 4 5 6 7 8 9 ( ) , < > / box ref",
] * 20


def tiny_llama_checkpoint(directory: str, rows: int = 0) -> str:
    """A 2-layer random Llama (GQA) with a SentencePiece tokenizer of its own (Llama's
    settings), saved as an HF checkpoint; `rows` (default: the tokenizer's ids) sizes its
    embedding."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS),
        model_prefix=os.path.join(directory, "tokenizer"),
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    os.remove(os.path.join(directory, "tokenizer.vocab"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(LLAMA_TOKENIZER, f)
    tokenizer = transformers.LlamaTokenizerFast.from_pretrained(directory)
    assert len(tokenizer) == 320
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=rows or len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def llava_config(checkpoint: str):
    c = load_config(f"{REPO}/experiments/llava.py:tiny")
    c.update(batch_size=8, total_steps=2, log_every=1, eval_every=2, checkpoint_every=2)
    c.evals = {}
    c.data.sequence.max_len = 200  # the checkpoint's small vocabulary spells words out
    c.model.vision.update(width=32, depth=2, mlp_dim=64)
    c.init_from = dict(format="hf_llm", path=checkpoint)
    c.optimizer.update(frozen=("lm/**",), warmup_steps=1, lr=1e-2)
    return c


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_llama_checkpoint(str(tmp_path_factory.mktemp("llama")))


def test_the_checkpoint_gives_the_run_its_architecture_and_tokenizer(checkpoint):
    bundle = build(llava_config(checkpoint))
    model = bundle.config.model
    rows = transformers.AutoConfig.from_pretrained(checkpoint).vocab_size
    assert (model.width, model.depth, model.num_kv_heads, model.mlp_dim) == (32, 2, 2, 64)
    assert bundle.config.data.tokenizer == "hf" and bundle.config.data.tokenizer_path == checkpoint
    # the VLM's specials (<image>, <ref>, ...) follow the checkpoint's ids: rows are added
    assert bundle.tokenizer.vocab_size > rows and model.vocab_size >= bundle.tokenizer.vocab_size
    hf = transformers.AutoTokenizer.from_pretrained(checkpoint)
    for text in ("what colour is the circle?", "find the 3 small boxes (0,12),(7,9)"):
        ids = hf.encode(text, add_special_tokens=False)
        assert bundle.tokenizer.encode(text) == ids
        assert bundle.tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_a_vlm_trains_from_an_imported_llm_with_the_lm_frozen(checkpoint, tmp_path, scan_layers):
    """The import stacks the LM for a scanned model; read back unscanned, it is the HF one."""
    workdir = str(tmp_path / "run")
    config = llava_config(checkpoint)
    config.model.scan_layers = scan_layers
    train_and_evaluate(config, workdir)
    trained = load_trained(workdir, ["model.scan_layers=false"])
    assert trained.step == 2
    lm = flatten_dict(trained.params["lm"], sep="/")
    hf = flatten_dict(convert.from_hf_llm(checkpoint).params, sep="/")
    rows = hf["token_embedding/embedding"].shape[0]
    for path, value in hf.items():
        got = np.asarray(lm[path])
        if path == "token_embedding/embedding":
            got = got[:rows]  # the added rows: the specials
        elif path == "lm_head/kernel":
            got = got[:, :rows]
        np.testing.assert_array_equal(got, np.asarray(value), err_msg=path)
    # ... while the connector, which is not frozen, moved from its initialisation
    fresh = build(llava_config(checkpoint))
    init = fresh.model.init(
        jax.random.key(fresh.config.seed),
        {k: np.zeros(v.shape, v.dtype) for k, v in fresh.example().items()},
    )["params"]
    before = flatten_dict(init["connector"], sep="/")
    after = flatten_dict(trained.params["connector"], sep="/")
    assert any(not np.array_equal(np.asarray(after[k]), np.asarray(before[k])) for k in before)

    # ... and the run's LM leaves mmjax as an HF checkpoint that transformers runs the same
    out = tmp_path / "hf"
    assert export(workdir, str(out), dtype="float32")["model_type"] == "llama"
    back = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = np.random.default_rng(0).integers(0, 300, (2, 9))
    lm_model = build(llava_config(checkpoint)).model.language_model(
        dtype=jax.numpy.float32, attention_impl="xla"
    )
    positions = np.broadcast_to(np.arange(9), (2, 9))
    ours = lm_model.apply({"params": trained.params["lm"]}, tokens, None, positions)
    with torch.no_grad():
        theirs = back(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    ours_ids = trained.bundle.tokenizer.encode("a red circle")
    assert hf_tokenizer.encode("a red circle", add_special_tokens=False) == ours_ids
    with pytest.raises(UserError, match="exists and is not an empty directory"):
        export(workdir, str(out))


def test_bad_input_is_one_clear_line_and_writes_nothing(checkpoint, tmp_path):
    clip = load_config(f"{REPO}/experiments/clip.py:tiny")
    clip.init_from = dict(format="hf_llm", path=checkpoint)
    with pytest.raises(UserError, match="needs a model holding a causal LM"):
        build(clip)
    (tmp_path / "small_embedding").mkdir()
    small = tiny_llama_checkpoint(str(tmp_path / "small_embedding"), rows=200)
    with pytest.raises(UserError, match=r"has \d+ ids but the checkpoint's embedding has \d+ rows"):
        build(llava_config(small))
    for source, message in [
        (dict(format="nope", path=checkpoint), r"init_from\.more\.x\.format 'nope' is not one of"),
        (dict(format="hf_clip", path=checkpoint), r"init_from\.more\.x needs load="),
        (dict(format="hf_clip", path=checkpoint, size=3), r"init_from\.more\.x: unknown keys"),
    ]:
        config = llava_config(checkpoint)
        config.init_from.more = {"x": source}
        with pytest.raises(UserError, match=message):
            build(config)
    workdir = tmp_path / "never"
    with pytest.raises(UserError, match="does not exist"):
        config = llava_config(str(tmp_path / "nowhere"))
        train_and_evaluate(config, str(workdir))
    assert not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.slow
def test_llava_starts_from_an_hf_llm_and_an_hf_clip_image_tower(checkpoint, tmp_path):
    """LLaVA stage 1's start: the LM from an HF Llama, the ViT from an HF CLIP's image tower
    (an init_from.more source of converted weights), both frozen and kept bit for bit, the
    CLIP's preprocessing in the run's data config."""
    clip_dir = str(tmp_path / "clip")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, max_position_embeddings=16, hidden_size=32,
                         num_hidden_layers=1, num_attention_heads=4, intermediate_size=64),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, image_size=32, patch_size=4),
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(1)
    transformers.CLIPModel(config).save_pretrained(clip_dir)
    clip = convert.from_hf_clip(clip_dir)
    c = load_config(f"{REPO}/experiments/llava.py:tiny")
    c.update(batch_size=8, total_steps=2, log_every=1, eval_every=2, checkpoint_every=2)
    c.evals = {}
    c.data.sequence.max_len = 200
    c.model.vision = dict(clip.model["image"])
    vision = dict(format="hf_clip", path=clip_dir, load={"vision": "image_tower"})
    c.init_from = dict(format="hf_llm", path=checkpoint, more=dict(vision=vision))
    c.optimizer.update(frozen=("lm/**", "vision/**"), warmup_steps=1)
    workdir = str(tmp_path / "run")
    train_and_evaluate(c, workdir)
    trained = load_trained(workdir)
    assert tuple(trained.config.data.image_mean) == clip.image_mean
    got = flatten_dict(trained.params["vision"], sep="/")
    want = flatten_dict(clip.params["image_tower"], sep="/")
    # feature_layer=-2: the ViT's last block and final norm are not built, nor loaded
    assert set(got) < set(want) and "encoder/block0/attn/query/kernel" in got
    for path, value in got.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[path]), err_msg=path)
    bad = dict(vision, load={"vision": "no_such_tower"})
    c.init_from = dict(format="hf_llm", path=checkpoint, more=dict(vision=bad))
    with pytest.raises(UserError, match=r"init_from\.more\.vision\.load: the import has no"):
        train_and_evaluate(c, str(tmp_path / "bad"))
