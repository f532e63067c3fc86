"""CED audio transformer (Dinkel et al., "CED: Consistent ensemble distillation for audio tagging", 2023).

A ViT over 16x16 patches of a log-mel fbank with separate time and frequency position embeddings. The module names
follow the released CED checkpoints (``init_bn``, ``patch_embed.proj``, ``blocks.N.attn.q_proj`` ...) so that the
original weights and the LoRA'd LAVCap checkpoints map onto this model key for key, except that the fused ``qkv``
projection of the original release is split into ``q_proj``/``k_proj``/``v_proj`` for LoRA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from ._compat import attention_function, init
from .configuration_lavcap import CedConfig


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in plain torch, the reference the other implementations must match.

    Args:
        query, key, value: (B, heads, N, head_dim).
        attention_mask: additive mask broadcastable to (B, heads, N, N), or None.
    Returns:
        the attended values (B, N, heads, head_dim) and the attention weights (B, heads, N, N), as every function
        of transformers' `AttentionInterface` returns them.
    """
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    attended = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return attended, weights


class CedAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (LoRA targets).

    The attention itself is the function `config._attn_implementation` names in transformers' `AttentionInterface`
    ("eager": `eager_attention_forward`, "sdpa", "flash_attention_2", or a registered kernel).
    """

    is_causal = False  # read by the library's sdpa and flash functions

    def __init__(self, config: CedConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, C) -> (B, N, C), and the attention weights (B, heads, N, N) where the implementation gives them
        (eager) or None."""
        batch, length, dim = hidden_states.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        query, key, value = (
            p(hidden_states).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        attention = attention_function(self.config._attn_implementation, eager_attention_forward)
        attended, weights = attention(
            self, query, key, value, None, scaling=self.scaling, dropout=0.0, **kwargs
        )
        return self.proj(attended.reshape(batch, length, dim)), weights


class CedMlp(nn.Module):
    def __init__(self, config: CedConfig) -> None:
        super().__init__()
        hidden = int(config.hidden_size * config.mlp_ratio)
        self.fc1 = nn.Linear(config.hidden_size, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class CedBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: CedConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = CedAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CedMlp(config)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, C) -> (B, N, C) and the attention weights (B, heads, N, N) or None."""
        attended, weights = self.attn(self.norm1(hidden_states), **kwargs)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.norm2(hidden_states)), weights


class Float32BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose affine weights and running statistics stay float32 whatever the dtype of the model.

    In training mode the running statistics move by `momentum` (0.01) times the batch deviation per step; in bf16
    such increments mostly round away. Here the tensors are created float32 (also under a half-precision default
    dtype), dtype casts of the module (`model.to(torch.bfloat16)`, `.half()`) pass them by while device moves still
    apply, and the input is normalised in float32 and returned in its own dtype.
    """

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        super().__init__(num_features, **{**kwargs, "dtype": torch.float32})

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in any float dtype -> (B, C, H, W) in the same dtype, normalised in float32."""
        # Cast explicitly: half-precision input with float32 statistics is a per-backend capability of batch_norm
        # (torch 2.13 has it on CPU and CUDA), not something every device plugin offers.
        return super().forward(hidden_states.float()).to(hidden_states.dtype)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        def keep_float32(tensor: torch.Tensor) -> torch.Tensor:
            moved = fn(tensor)
            if tensor.is_floating_point() and moved.dtype != torch.float32:
                # Re-done from the original tensor, not from `moved`: its values would already be rounded.
                return tensor.to(device=moved.device, dtype=torch.float32)
            return moved

        return super()._apply(keep_float32, recurse)


class CedPatchEmbed(nn.Module):
    def __init__(self, config: CedConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """(B, 1, mel, frames) -> (B, C, mel/16, frames/16)."""
        return self.proj(spectrogram)


class CedPreTrainedModel(PreTrainedModel):
    config_class = CedConfig
    base_model_prefix = "ced"
    main_input_name = "input_features"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CedBlock"]
    # Attention goes through `AttentionInterface` (CedAttention): every registered implementation applies.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """True: `CedAttention` dispatches through `AttentionInterface` (via `_compat.attention_function`), which
        the library's check, a search of this module's source for its own dispatch idiom, does not recognise."""
        return True

    # Loaded in float32 also under from_pretrained(dtype=bfloat16 / float16): Transformers 5.x gathers this into
    # composite models; 4.55 does not, and relies on Float32BatchNorm2d creating its tensors in float32.
    _keep_in_fp32_modules_strict = ["init_bn"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """With the library's init functions, which leave tensors alone that a checkpoint filled (5.x)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if module.running_mean is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, CedModel):
            init.normal_(module.time_pos_embed, std=std)
            init.normal_(module.freq_pos_embed, std=std)


class CedModel(CedPreTrainedModel):
    """CED encoder: fbank (B, frames, mel) -> patch tokens (B, (mel/16) * (frames/16), C), frequency-major.

    For the paper's 64 x 1024 input this is (B, 256, 768): token `f * 64 + t` is frequency row `f`, time column `t`.
    Inputs shorter than `target_length` use the first time position embeddings; longer ones are rejected.
    """

    def __init__(self, config: CedConfig) -> None:
        super().__init__(config)
        self.init_bn = Float32BatchNorm2d(config.num_mel_bins, momentum=config.batch_norm_momentum)
        self.patch_embed = CedPatchEmbed(config)
        self.time_pos_embed = nn.Parameter(torch.zeros(1, config.hidden_size, 1, config.time_patches))
        self.freq_pos_embed = nn.Parameter(torch.zeros(1, config.hidden_size, config.freq_patches, 1))
        self.blocks = nn.ModuleList(CedBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_features: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        return_dict: bool = True,
    ) -> BaseModelOutput | tuple:
        """
        Args:
            input_features: normalised log-mel fbank (B, frames, mel), frames <= `target_length`, frames and mel
                multiples of the patch size.
            output_hidden_states: also return the tokens entering each block and leaving the last (before `norm`).
            output_attentions: also return each block's attention weights (B, heads, N, N); only the "eager"
                implementation computes them (the others give None).
        Returns:
            `last_hidden_state` (B, (mel/16) * (frames/16), C), frequency-major; `hidden_states` and `attentions`
            tuples when asked for.
        """
        self._check_input(input_features)
        # BatchNorm over mel bins: (B, frames, mel) -> (B, mel, 1, frames), the layout the release normalises; in
        # float32 (statistics and features), then in the dtype of the patch embedding.
        spectrogram = self.init_bn(input_features.float().transpose(1, 2).unsqueeze(2)).transpose(1, 2)
        patches = self.patch_embed(spectrogram.to(self.patch_embed.proj.weight.dtype))
        time_patches = patches.shape[-1]
        patches = patches + self.time_pos_embed[..., :time_patches] + self.freq_pos_embed
        hidden_states = patches.flatten(2).transpose(1, 2)  # (B, C, F, T) -> (B, F*T, C), frequency-major
        all_hidden = [hidden_states] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and not hidden_states.requires_grad:
            # Reentrant checkpointing (the 4.55 default) only back-propagates into blocks whose input requires
            # grad; with a frozen patch embedding, LoRA inside the blocks would get no gradient.
            hidden_states.requires_grad_(True)
        for block in self.blocks:
            if checkpointing:
                hidden_states, weights = self._gradient_checkpointing_func(block.__call__, hidden_states)
            else:
                hidden_states, weights = block(hidden_states)
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            if all_attentions is not None:
                all_attentions.append(weights)
        hidden_states = self.norm(hidden_states)
        output = BaseModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_attentions) if all_attentions is not None else None,
        )
        return output if return_dict else output.to_tuple()

    def _check_input(self, input_features: torch.Tensor) -> None:
        config = self.config
        if input_features.ndim != 3 or input_features.shape[-1] != config.num_mel_bins:
            raise ValueError(
                f"input_features must have shape (batch, frames, {config.num_mel_bins}), got {tuple(input_features.shape)}"
            )
        frames = input_features.shape[1]
        if frames > config.target_length or frames % config.patch_size:
            raise ValueError(
                f"input_features has {frames} frames; CED takes a multiple of {config.patch_size} frames up to "
                f"target_length={config.target_length}"
            )


def interpolate_time_pos_embed(time_pos_embed: torch.Tensor, time_patches: int) -> torch.Tensor:
    """Resize CED time position embeddings (1, C, 1, T) -> (1, C, 1, time_patches).

    Cut when shorter, bilinear interpolation (align_corners=False) when longer, as the official CED loader does
    (the original release covers 63 patches, LAVCap's 1024 frames need 64).
    """
    if time_patches <= time_pos_embed.shape[-1]:
        return time_pos_embed[..., :time_patches].clone()
    resized = F.interpolate(
        time_pos_embed.float(), size=(1, time_patches), mode="bilinear", align_corners=False
    )
    return resized.to(time_pos_embed.dtype)
