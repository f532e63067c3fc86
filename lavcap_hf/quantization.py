"""Quantized LAVCap: the decoder's linear layers in 4-bit (NF4 / FP4) or 8-bit through bitsandbytes.

`LavCapForConditionalGeneration.from_pretrained(folder, quantization_config=...)` quantizes the decoder only: the
audio tower, the fusion, the projector and the output head keep their dtype (CLIP too, unless
`quantize_vision_tower=True`). This module builds those configs from the one option the commands take
(`--quantize 4bit|8bit`), loads models with them, names the layers that ended quantized, and prepares a 4-bit model
for QLoRA training. bitsandbytes is the optional `quantization` extra: without it, asking for a quantized model
fails at once with an error that names the extra.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .model._compat import dtype_kwarg

QUANTIZE_CHOICES = ("4bit", "8bit")
"""The values of `--quantize`: NF4 with double quantisation, or LLM.int8()."""

QUANTIZATION_EXTRA = 'pip install "lavcap-hf[quantization]"'


def require_bitsandbytes() -> None:
    """ImportError naming the `quantization` extra where bitsandbytes cannot be imported."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # not installed (ImportError), or a broken install, which raises others too
        raise ImportError(
            f"quantized loading needs bitsandbytes, which could not be imported ({error}): install the "
            f"quantization extra, {QUANTIZATION_EXTRA}"
        ) from error


def bitsandbytes_config(
    quantize: str,
    compute_dtype: torch.dtype = torch.float32,
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> Any:
    """A `BitsAndBytesConfig` for `quantize` ("4bit": `quant_type` NF4 or FP4, computing in `compute_dtype`, with
    double quantisation of the block scales; "8bit": LLM.int8()). Checks that bitsandbytes imports."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def quantized_loading_kwargs(
    quantize: str | None, device: str | torch.device, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """`from_pretrained` keywords that load a model quantized as `quantize` says onto `device` (bitsandbytes places
    the weights while it quantizes them: the model is not moved afterwards), computing in `dtype`; {} for None."""
    if quantize is None:
        return {}
    return {
        "quantization_config": bitsandbytes_config(quantize, compute_dtype=dtype),
        "device_map": {"": str(device)},
        dtype_kwarg(): dtype,
    }


def pipeline_placement(device: str | None, quantize: str | None) -> dict[str, Any]:
    """`pipeline()` keywords that put the model on `device` (default: transformers' choice) with its decoder
    quantized as `quantize` says: a quantized model is placed by its loading (`model_kwargs`), not moved, and
    computes in bfloat16 on a GPU, float32 on a CPU."""
    if quantize is None:
        return {"device": device}
    target = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if str(target).startswith("cpu") else torch.bfloat16
    return {"model_kwargs": quantized_loading_kwargs(quantize, target, dtype)}


def load_for_inference(
    model: str | os.PathLike,
    quantize: str | None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> nn.Module:
    """A `LavCapForConditionalGeneration` from `model` in eval mode on `device`, computing in `dtype`, with its decoder
    quantized as `quantize` says (None: unquantized, cast to `dtype`); `kwargs` for `from_pretrained`."""
    from .model.modeling_lavcap import LavCapForConditionalGeneration

    loading = quantized_loading_kwargs(quantize, device, dtype)
    network = LavCapForConditionalGeneration.from_pretrained(model, **loading, **kwargs)
    if quantize is None:
        network = network.to(device=device, dtype=dtype)
    return network.eval()


def is_quantized_layer(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (peft's LoRA wrappers around one are not)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") and type(module).__module__.startswith(
        "bitsandbytes"
    )


def quantized_module_names(model: nn.Module) -> list[str]:
    """The names of `model`'s quantized linear layers, in module order."""
    return [name for name, module in model.named_modules() if is_quantized_layer(module)]


def quantization_of(model: nn.Module) -> dict[str, Any] | None:
    """The quantization a loaded model runs with, as its config records it (None: unquantized)."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """peft's `prepare_model_for_kbit_training` on a quantized LAVCap, before its adapters are added: every weight
    frozen, the unquantized parts that are not float32 cast up (CED's BatchNorm and the trained parts train in
    float32), the input embeddings' output requiring grad so that checkpointed decoder layers pass gradients
    back, and activation checkpointing with re-entrant off (the towers' blocks and the decoder's layers)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
