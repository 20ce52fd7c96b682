"""Hugging Face LLaVA multimodal projector -> mmjax's `mlp` connector (models/resamplers.py).

  imported = mmjax.convert.from_hf_llava(model)  # LlavaModel, LlavaForConditionalGeneration,
                                                 # or a local directory
  imported = mmjax.convert.from_hf_llava(model.multi_modal_projector, config=model.config)

HF's `LlavaMultiModalProjector` is linear_1 -> `projector_hidden_act` -> linear_2 (LLaVA-1.5,
Sec. 3.1), mmjax's `mlp` connector fc1 -> activation -> fc2.
"""

from typing import Any

from mmjax.convert.hf_blip2 import ImportedConnector, finish_connector, load, model_type
from mmjax.convert.imported import activation
from mmjax.convert.torch_layers import Reader
from mmjax.errors import UserError

SOURCE = "HF LLaVA projector"
PREFIX = "multi_modal_projector."


def _config_and_state(model: Any, config: Any) -> tuple[Any, dict[str, Any]]:
    """The LlavaConfig and the projector's tensors keyed `linear_1.*` / `linear_2.*`."""
    if type(model).__name__ == "LlavaMultiModalProjector":
        if config is None:
            raise UserError(
                f"{SOURCE}: a bare LlavaMultiModalProjector needs config= (its LlavaConfig, "
                "which holds the activation)"
            )
        return config, dict(model.state_dict())
    kind = model_type(model)
    if kind != "llava":
        raise UserError(
            f"expected a 'llava' model or a LlavaMultiModalProjector but got a {kind!r} one; "
            "use mmjax.convert.from_hf_blip2 for BLIP-2 Q-Formers"
        )
    state = {k.split(PREFIX, 1)[1]: v for k, v in model.state_dict().items() if PREFIX in k}
    return model.config, state


def convert(model_or_path: Any, *, config: Any = None) -> ImportedConnector:
    """Imports an HF LLaVA model's (or a bare projector's) multimodal projector."""
    config, state = _config_and_state(load(model_or_path), config)
    if getattr(config, "model_type", None) != "llava":
        raise UserError(f"{SOURCE}: config= must be a LlavaConfig, got {type(config).__name__}")
    if not config.multimodal_projector_bias:
        raise UserError(
            f"{SOURCE}: multimodal_projector_bias=False, but mmjax's mlp connector has biases"
        )
    read = Reader(state, SOURCE)
    params = {"fc1": read.linear("linear_1"), "fc2": read.linear("linear_2")}
    connector = dict(
        type="mlp",
        out_dim=params["fc2"]["kernel"].shape[1],
        activation=activation(config.projector_hidden_act, SOURCE),
    )
    return finish_connector(connector, params, params["fc1"]["kernel"].shape[0], SOURCE)
