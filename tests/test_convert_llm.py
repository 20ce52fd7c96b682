"""Hugging Face causal LMs -> mmjax's CausalLM and back: logit parity with `transformers` for
small random Llama (GQA), Qwen2 (QKV bias, GQA, tied embeddings), Gemma-2 (soft-capping,
sliding window on alternate layers, longer sequences than the window) and OPT (LayerNorm, ReLU,
biases, learned positions), full forward and KV-cached greedy decoding; the safetensors reader;
the export round trip; clear errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmjax import convert  # noqa: E402
from mmjax.convert.tensor_files import Checkpoint, SafetensorsFile, write_safetensors  # noqa: E402
from mmjax.errors import UserError  # noqa: E402

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
ARCHITECTURES = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            rope_theta=500_000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
    ),
    "opt": (  # the GPT-3 block: LayerNorm, ReLU, biases, learned positions, tied embeddings
        transformers.OPTConfig,
        transformers.OPTForCausalLM,
        dict(ffn_dim=64, word_embed_proj_dim=COMMON["hidden_size"]),
    ),
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        dict(
            head_dim=16,  # not hidden_size / heads (8), as in Gemma-2
            query_pre_attn_scalar=12,
            sliding_window=5,  # shorter than the sequences below
            attn_logit_softcapping=2.0,  # small caps, so that capping changes the logits
            final_logit_softcapping=3.0,
        ),
    ),
}
LENGTH = 12


def hf_model(arch: str, seed: int = 0):
    """A small random HF causal LM in f32 with eager attention (the reference semantics)."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    common = dict(COMMON)
    if arch == "opt":  # full multi-head attention, its MLP width named ffn_dim
        del common["intermediate_size"], common["num_key_value_heads"]
    config = config_cls(**common, **extra, attn_implementation="eager")
    model = model_cls(config).eval().float()
    with torch.no_grad():  # random norm scales, so a norm mapped wrongly shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if arch == "gemma2" else 1.0))
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def mmjax_logits(imported, tokens: np.ndarray, impl: str = "xla") -> np.ndarray:
    lm = imported.module(dtype=jnp.float32, attention_impl=impl)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(lm.apply({"params": imported.params}, jnp.asarray(tokens), None, positions))


def greedy(imported, prompt: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """KV-cached greedy decoding: prefill the prompt, then one cached token a step; returns
    the new tokens [B, steps] and the logits of each step [B, steps, vocab]."""
    lm = imported.module(dtype=jnp.float32, attention_impl="xla", decode=True)
    b, p = prompt.shape
    total = p + steps
    zeros = jnp.zeros((b, total), jnp.int32)
    cache = lm.init(jax.random.key(0), zeros, None, zeros)["cache"]

    @jax.jit
    def run(cache, tokens, offset):
        positions = offset + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits, state = lm.apply(
            {"params": imported.params, "cache": cache},
            tokens,
            None,
            positions,
            jnp.full((b,), offset, jnp.int32),
            mutable=["cache"],
        )
        return logits[:, -1], state["cache"]

    logits, cache = run(cache, jnp.asarray(prompt), 0)
    new, steps_logits = [], []
    for i in range(steps):
        token = jnp.argmax(logits, -1)
        new.append(token)
        steps_logits.append(logits)
        logits, cache = run(cache, token[:, None], p + i)
    return np.stack(new, 1), np.stack(steps_logits, 1)


_SAVED: dict = {}


def save(arch: str, tmp_path_factory) -> tuple:
    """(arch, model, directory) of a saved random model, once per module and architecture;
    in small shards, so the import reads an index file and several safetensors files."""
    if arch not in _SAVED:
        model = hf_model(arch)
        path = str(tmp_path_factory.mktemp(arch))
        model.save_pretrained(path, max_shard_size="20KB")
        _SAVED[arch] = (arch, model, path)
    return _SAVED[arch]


@pytest.fixture(params=sorted(ARCHITECTURES))
def saved(request, tmp_path_factory):
    return save(request.param, tmp_path_factory)


def test_a_checkpoint_imports_with_equal_logits(saved):
    arch, model, path = saved
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    imported = convert.from_hf_llm(path)
    assert imported.model_type == arch
    tokens = np.random.default_rng(0).integers(0, COMMON["vocab_size"], (2, LENGTH))
    want = hf_logits(model, tokens)
    np.testing.assert_allclose(mmjax_logits(imported, tokens), want, atol=1e-4, rtol=0)
    if arch == "gemma2":  # the caps and the window are in the computation: turning them off
        off = dict(imported.lm, attn_logit_softcap=None, sliding_window=None)
        changed = convert.ImportedLM(off, imported.params, arch, None)
        assert np.abs(mmjax_logits(changed, tokens) - want).max() > 1e-2


def test_gemma2_pallas_kernel_gives_the_same_logits(tmp_path_factory):
    _, model, path = save("gemma2", tmp_path_factory)
    imported = convert.from_hf_llm(path)
    tokens = np.random.default_rng(1).integers(0, COMMON["vocab_size"], (1, LENGTH))
    np.testing.assert_allclose(
        mmjax_logits(imported, tokens, impl="pallas"), hf_logits(model, tokens), atol=1e-4, rtol=0
    )


def test_kv_cached_greedy_decoding_matches_transformers(saved):
    _, model, path = saved
    imported = convert.from_hf_llm(path)
    prompt = np.random.default_rng(2).integers(0, COMMON["vocab_size"], (2, 4))
    ours, ours_logits = greedy(imported, prompt, 16)
    model.generation_config.eos_token_id = None  # 16 tokens whatever they are, unprocessed
    with torch.no_grad():
        out = model.generate(
            torch.as_tensor(prompt),
            max_new_tokens=16,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    theirs = out.sequences[:, prompt.shape[1] :].numpy()
    np.testing.assert_array_equal(ours, theirs)
    theirs_logits = torch.stack(out.logits, 1).float().numpy()
    np.testing.assert_allclose(ours_logits, theirs_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_round_trip_loads_in_transformers(saved, tmp_path, dtype):
    arch, model, path = saved
    imported = convert.from_hf_llm(path)
    assert convert.to_hf_llm(imported.lm, imported.params, str(tmp_path), dtype=dtype) == arch
    back = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = np.random.default_rng(3).integers(0, COMMON["vocab_size"], (2, LENGTH))
    tol = 1e-4 if dtype == "float32" else 0.1
    np.testing.assert_allclose(hf_logits(back, tokens), hf_logits(model, tokens), atol=tol)
    again = convert.from_hf_llm(str(tmp_path))
    assert again.lm == imported.lm


def test_safetensors_reader_reads_what_torch_writes(tmp_path):
    from safetensors.torch import save_file

    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5).bfloat16(),
        "c": torch.arange(6, dtype=torch.int32).reshape(2, 3),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    got = SafetensorsFile(str(tmp_path / "x.safetensors"))
    assert sorted(got) == ["a", "b", "c"]
    for k, v in tensors.items():
        np.testing.assert_array_equal(np.asarray(got[k], np.float32), v.float().numpy())
    write_safetensors(str(tmp_path / "y.safetensors"), {k: got[k] for k in got}, {"format": "pt"})
    from safetensors.torch import load_file

    again = load_file(str(tmp_path / "y.safetensors"))
    for k, v in tensors.items():
        assert torch.equal(again[k], v)


def test_errors_are_one_clear_line(tmp_path_factory, tmp_path):
    _, _, path = save("llama", tmp_path_factory)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    broken = tmp_path / "missing_shard"
    broken.mkdir()
    for name in os.listdir(path):
        if name != shards[-1]:
            os.symlink(os.path.join(path, name), broken / name)
    with pytest.raises(UserError, match=f"shard {shards[-1]} named by .* is missing"):
        convert.from_hf_llm(str(broken))

    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)  # fmt: skip
    with pytest.raises(UserError, match="model_type 'bert' is not one of"):
        convert.from_hf_llm(str(bert))
    with pytest.raises(UserError, match="does not exist"):
        convert.load({"format": "hf_llm", "path": str(tmp_path / "nowhere")})


def test_unsupported_settings_are_refused():
    base = dict(COMMON, model_type="llama", hidden_act="silu", rms_norm_eps=1e-5)
    with pytest.raises(UserError, match="attention_bias=True"):
        convert.hf_llm.lm_fields({**base, "attention_bias": True})
    with pytest.raises(UserError, match="rope scaling 'yarn' is not supported"):
        convert.hf_llm.lm_fields({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(UserError, match="has an HF equivalent in gemma2 only"):
        convert.hf_llm.hf_config({**convert.hf_llm.lm_fields(base), "attn_logit_softcap": 5.0},
            128, "float32")  # fmt: skip


def test_checkpoint_mapping_is_lazy(saved):
    """Reading a checkpoint maps its files; a tensor is read when asked for."""
    _, _, path = saved
    ckpt = Checkpoint(path)
    (embedding,) = [k for k in ckpt if k.endswith("embed_tokens.weight")]
    assert ckpt[embedding].shape == (COMMON["vocab_size"], COMMON["hidden_size"])
