"""Connector import: small randomly initialised HF BLIP-2 Q-Formers and LLaVA projectors,
converted to mmjax connectors, give the same outputs (f32, within 1e-4); wrong architectures
fail with one clear line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import convert
from mmjax.errors import UserError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
QFORMER_CONFIGS = {
    # every other layer cross-attends (BLIP-2's frequency), queries only, a projection
    "freq2_queries_only": dict(
        qformer=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=37, encoder_hidden_size=24, cross_attention_frequency=2),
        num_queries=6, image_tokens=10, projection=20,
    ),
    # every layer cross-attends, text inputs (ITM/ITC), no projection, relu
    "freq1_text": dict(
        qformer=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=40, encoder_hidden_size=40, cross_attention_frequency=1,
                     use_qformer_text_input=True, vocab_size=50, max_position_embeddings=16,
                     hidden_act="relu", layer_norm_eps=1e-6),
        num_queries=5, image_tokens=7, projection=None,
    ),
}  # fmt: skip


def hf_qformer(name: str):
    """(Blip2QFormerModel, query tokens, text embeddings or None, projection or None)."""
    c = QFORMER_CONFIGS[name]
    config = transformers.Blip2QFormerConfig(**c["qformer"])
    torch.manual_seed(0)
    qformer = transformers.Blip2QFormerModel(config).eval()
    queries = torch.randn(1, c["num_queries"], config.hidden_size)
    embeddings = None
    if config.use_qformer_text_input:
        from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

        embeddings = Blip2TextEmbeddings(config).eval()
    projection = None
    if c["projection"]:
        projection = torch.nn.Linear(config.hidden_size, c["projection"]).eval()
    return qformer, queries, embeddings, projection


def image_features(name: str) -> torch.Tensor:
    c = QFORMER_CONFIGS[name]
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, c["image_tokens"], c["qformer"]["encoder_hidden_size"], generator=g)


@pytest.mark.parametrize("name", sorted(QFORMER_CONFIGS))
def test_hf_qformer_parity(name):
    qformer, queries, embeddings, projection = hf_qformer(name)
    imported = convert.from_hf_blip2(
        qformer, query_tokens=queries, text_embeddings=embeddings, projection=projection
    )
    module = imported.module()
    pixels = image_features(name)
    out = jax.jit(module.apply)({"params": imported.params}, jnp.asarray(pixels.numpy()))
    with torch.no_grad():
        ref = qformer(query_embeds=queries.expand(3, -1, -1), encoder_hidden_states=pixels)
        ref = ref.last_hidden_state
        ref = projection(ref) if projection is not None else ref
    assert out.shape == ref.shape == (3, queries.shape[1], imported.connector["out_dim"] or 48)
    np.testing.assert_allclose(out, ref.numpy(), atol=TOL)


def text_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [3, 6] and their mask: rows of 6, 4 and 1 tokens (right padding)."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, vocab, (3, 6), generator=g)
    mask = (torch.arange(6)[None] < torch.tensor([[6], [4], [1]])).long()
    return ids * mask, mask


def test_hf_qformer_text_parity_under_the_itm_and_itc_masks():
    """Bidirectional (ITM): HF's joint pass over [queries; text] with a padding mask; unimodal
    (ITC): HF's query pass and its separate text pass (query_length=0), as BLIP-2 retrieval
    runs them. Padding positions are not compared."""
    qformer, queries, embeddings, _ = hf_qformer("freq1_text")
    imported = convert.from_hf_blip2(qformer, query_tokens=queries, text_embeddings=embeddings)
    module = imported.module()
    pixels = image_features("freq1_text")
    ids, mask = text_batch(imported.connector["vocab_size"])
    q = queries.shape[1]
    query_mask = torch.ones(3, q, dtype=torch.long)
    with torch.no_grad():
        joint = qformer(
            query_embeds=embeddings(input_ids=ids, query_embeds=queries.expand(3, -1, -1)),
            query_length=q,
            attention_mask=torch.cat([query_mask, mask], 1),
            encoder_hidden_states=pixels,
        ).last_hidden_state
        alone = qformer(
            query_embeds=queries.expand(3, -1, -1), encoder_hidden_states=pixels
        ).last_hidden_state
        text_alone = qformer(
            query_embeds=embeddings(input_ids=ids), query_length=0, attention_mask=mask
        ).last_hidden_state
    valid = mask.numpy().astype(bool)

    def encode(mode):
        return module.apply(
            {"params": imported.params},
            jnp.asarray(pixels.numpy()),
            text_ids=jnp.asarray(ids.numpy()),
            text_mask=jnp.asarray(valid),
            mask=mode,
            method="encode",
        )

    itm, itc = encode("bidirectional"), encode("unimodal")
    np.testing.assert_allclose(itm.queries, joint[:, :q].numpy(), atol=TOL)
    np.testing.assert_allclose(np.asarray(itm.text)[valid], joint[:, q:].numpy()[valid], atol=TOL)
    np.testing.assert_allclose(itc.queries, alone.numpy(), atol=TOL)
    np.testing.assert_allclose(np.asarray(itc.text)[valid], text_alone.numpy()[valid], atol=TOL)


def test_hf_blip2_model_imports_whole_and_from_a_local_directory(tmp_path):
    """A whole Blip2Model (query tokens and language projection inside), saved and reloaded."""
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, image_size=8, patch_size=4),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=40),
        text_config=dict(model_type="opt", vocab_size=64, hidden_size=24, num_hidden_layers=1,
                         num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=24,
                         max_position_embeddings=32),
        num_query_tokens=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Blip2Model(config).eval()
    model.save_pretrained(tmp_path)
    imported = convert.from_hf_blip2(str(tmp_path))
    assert imported.connector["out_dim"] == 24 and imported.in_dim == 16
    pixels = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.qformer(
            query_embeds=model.query_tokens.expand(2, -1, -1), encoder_hidden_states=pixels
        ).last_hidden_state
        ref = model.language_projection(ref)
    out = imported.module().apply({"params": imported.params}, jnp.asarray(pixels.numpy()))
    np.testing.assert_allclose(out, ref.numpy(), atol=TOL)


LLAVA_CONFIGS = {
    "gelu_one_layer": dict(vision=24, text=40, feature_layer=-2, act="gelu"),
    "silu_two_feature_layers": dict(vision=16, text=32, feature_layer=[-2, -1], act="silu"),
}


def llava_config(name: str, **extra) -> "transformers.LlavaConfig":
    c = LLAVA_CONFIGS[name]
    return transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=c["vision"],
                           intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4),
        text_config=dict(model_type="llama", vocab_size=64, hidden_size=c["text"],
                         intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2),
        **{"vision_feature_layer": c["feature_layer"], "projector_hidden_act": c["act"], **extra},
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(LLAVA_CONFIGS))
def test_hf_llava_projector_parity(name):
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = llava_config(name)
    torch.manual_seed(0)
    projector = LlavaMultiModalProjector(config).eval()
    imported = convert.from_hf_llava(projector, config=config)
    assert imported.connector == dict(
        type="mlp", out_dim=config.text_config.hidden_size, activation=LLAVA_CONFIGS[name]["act"]
    )
    features = torch.randn(3, 9, imported.in_dim, generator=torch.Generator().manual_seed(1))
    out = imported.module().apply({"params": imported.params}, jnp.asarray(features.numpy()))
    with torch.no_grad():
        ref = projector(features)
    np.testing.assert_allclose(out, ref.numpy(), atol=TOL)


def test_hf_llava_model_imports_from_a_local_directory(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(llava_config("gelu_one_layer")).eval()
    model.save_pretrained(tmp_path)
    imported = convert.from_hf_llava(str(tmp_path))
    features = torch.randn(2, 4, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.model.multi_modal_projector(features)
    out = imported.module().apply({"params": imported.params}, jnp.asarray(features.numpy()))
    np.testing.assert_allclose(out, ref.numpy(), atol=TOL)


def test_connector_converters_given_the_wrong_architecture_say_so():
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = llava_config("gelu_one_layer")
    projector = LlavaMultiModalProjector(config)
    qformer, queries, embeddings, _ = hf_qformer("freq1_text")
    with pytest.raises(UserError, match=r"expected a 'blip-2' model .* but got a 'Llava"):
        convert.from_hf_blip2(projector)
    with pytest.raises(UserError, match=r"expected a 'llava' model .* but got a 'blip_2_qformer'"):
        convert.from_hf_llava(qformer)
    with pytest.raises(UserError, match="needs query_tokens="):
        convert.from_hf_blip2(qformer)
    with pytest.raises(UserError, match="use_qformer_text_input=True but text embeddings are"):
        convert.from_hf_blip2(qformer, query_tokens=queries)
    with pytest.raises(UserError, match=r"query_tokens must be \[1, Q, hidden\]"):
        convert.from_hf_blip2(qformer, query_tokens=queries[0], text_embeddings=embeddings)
    with pytest.raises(UserError, match=r"query_tokens has shape \(5, 47\)"):
        convert.from_hf_blip2(qformer, query_tokens=queries[..., 1:], text_embeddings=embeddings)
    with pytest.raises(UserError, match="needs config="):
        convert.from_hf_llava(projector)
    bias_free = llava_config("gelu_one_layer", multimodal_projector_bias=False)
    with pytest.raises(UserError, match="multimodal_projector_bias=False"):
        convert.from_hf_llava(LlavaMultiModalProjector(bias_free), config=bias_free)
    odd = llava_config("gelu_one_layer", projector_hidden_act="tanh")
    with pytest.raises(UserError, match="activation 'tanh' has no mmjax equivalent"):
        convert.from_hf_llava(LlavaMultiModalProjector(odd), config=odd)
