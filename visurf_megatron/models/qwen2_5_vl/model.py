"""Qwen2.5-VL as one megatron-core module: vision tower (first pipeline stage) + GPTModel with mrope.

The model does not know how it is launched: it reads process groups from megatron's parallel_state
and takes already-built configs (see ``config.configs_from_hf``) and a backend name (see ``specs``).
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from ..local_spec import block_spec_for_stage
from .config import Qwen25VLExtras
from .packing import packed_attention_inputs
from .specs import language_layer_spec, vision_layer_spec
from .vision import Qwen25VisionModel, VisionLayout


class Qwen25VLModel(MegatronModule):
    """forward(input_ids, position_ids, pixel_values, image_grid_thw) -> vocab-parallel logits or log-probs.

    * First stage: text embeddings, image embeddings scattered into the ``<|image_pad|>`` positions
      (in (batch, position) order, as transformers does), then sequence-parallel scatter.
    * Other stages: hidden states arrive through ``set_input_tensor``.
    * Last stage: logits [B, S, V/tp] with the vocabulary padding masked out, or, given ``labels``,
      per-token log-probs [B, S] computed vocab-parallel (no rank ever holds the full vocabulary).
    """

    def __init__(
        self,
        language_config: TransformerConfig,
        vision_config: TransformerConfig,
        extras: Qwen25VLExtras,
        *,
        backend: str = "local",
        pre_process: Optional[bool] = None,
        post_process: Optional[bool] = None,
        vp_stage: Optional[int] = None,
        freeze_vision: bool = False,
        freeze_merger: bool = False,
        freeze_language: bool = False,
    ):
        super().__init__(config=language_config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        if pre_process is None:
            pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        if post_process is None:
            post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        self.extras = extras
        self.pre_process, self.post_process = pre_process, post_process
        self.vp_stage = vp_stage
        self.backend = backend  # packed streams: a block mask (local) or THD params (TE)
        self.vision_model = (
            Qwen25VisionModel(vision_config, vision_layer_spec(backend, extras.family.vision_norm), extras, backend=backend)
            if pre_process else None
        )
        layer_spec = language_layer_spec(backend)
        if backend == "local":
            # The local block needs our sequence-parallel RMSNorm as its final norm too.
            layer_spec = block_spec_for_stage(layer_spec, language_config, vp_stage=vp_stage)
        self.language_model = GPTModel(
            config=language_config,
            transformer_layer_spec=layer_spec,
            vocab_size=extras.padded_vocab_size,
            max_sequence_length=extras.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=extras.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=extras.rope_theta,
            # Image embeddings go in before the sequence-parallel scatter, so we scatter ourselves.
            scatter_embedding_sequence_parallel=False,
            vp_stage=vp_stage,
        )
        self.share_embeddings_and_output_weights = extras.tie_word_embeddings
        self.freeze(vision=freeze_vision, merger=freeze_merger, language=freeze_language)

    # -- pipeline plumbing ------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def freeze(self, *, vision: bool = False, merger: bool = False, language: bool = False) -> None:
        if self.vision_model is not None:
            for name, param in self.vision_model.named_parameters():
                param.requires_grad_(not (merger if name.startswith("merger.") else vision))
        for param in self.language_model.parameters():
            param.requires_grad_(not language)

    # -- forward ----------------------------------------------------------------------------
    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        vision_layout: Optional[VisionLayout] = None,
        image_embed_index: Optional[torch.Tensor] = None,
        image_embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Decoder input [S(/tp under SP), B, H] for the first stage.

        ``image_embed_index`` [slots]: the vision output row for each placeholder (in order), when
        several rows share one encoding of their prompt's images (packed micro-batches).
        ``image_embeds``: that vision output, computed already (one pass for a whole update,
        ``training.forward``), instead of ``pixel_values``."""
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H]
        image_mask = input_ids == self.extras.image_token_id
        n_slots = int(image_mask.sum())
        if pixel_values is not None and image_embeds is not None:
            raise ValueError("pass pixel_values or precomputed image_embeds, not both")
        if pixel_values is not None or image_embeds is not None:
            if image_embeds is None:
                image_embeds = self.vision_model(pixel_values, image_grid_thw, vision_layout)
            if image_embed_index is not None:
                image_embeds = image_embeds.index_select(0, image_embed_index)
            if image_embeds.shape[0] != n_slots:
                raise ValueError(f"{image_embeds.shape[0]} image embeddings for {n_slots} image placeholder tokens")
            bsh = emb.transpose(0, 1)
            bsh = bsh.masked_scatter(image_mask.unsqueeze(-1).expand_as(bsh), image_embeds.to(bsh.dtype))
            emb = bsh.transpose(0, 1).contiguous()
        elif n_slots:
            raise ValueError(f"input_ids hold {n_slots} image placeholder tokens but no pixel_values or "
                             "image_embeds were given")
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        temperature: float = 1.0,
        vision_layout: Optional[VisionLayout] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
        image_embed_index: Optional[torch.Tensor] = None,
        image_embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``cu_seqlens`` (with ``max_seqlen``): input_ids [1, T] is a packed stream of rows, each
        attending to itself only (``packing``); ``image_embed_index``, ``image_embeds``: see ``embed``."""
        decoder_input = (self.embed(input_ids, pixel_values, image_grid_thw, vision_layout, image_embed_index,
                                    image_embeds) if self.pre_process else None)
        attention_mask = packed_seq_params = None
        if cu_seqlens is not None:
            attention_mask, packed_seq_params = packed_attention_inputs(
                cu_seqlens, max_seqlen, position_ids.shape[-1], backend=self.backend, config=self.config)
        output = self.language_model(
            input_ids=None, position_ids=position_ids, attention_mask=attention_mask, decoder_input=decoder_input,
            packed_seq_params=packed_seq_params,
        )
        if not self.post_process:
            return output  # hidden states for the next stage
        # Temperature first, then the padding mask: the mask value is the dtype's most negative
        # finite number, and dividing it by T < 1 would overflow to -inf (then 0 * -inf = NaN in
        # the entropy on the rank that holds the vocabulary padding).
        logits = output / temperature if temperature != 1.0 else output
        logits = self.mask_vocab_padding(logits)
        if labels is None:
            return logits
        return -tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)

    def mask_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """Padded vocabulary rows are not tokens: give them no probability mass."""
        extras = self.extras
        if extras.padded_vocab_size == extras.vocab_size:
            return logits
        local = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * local
        if start + local <= extras.vocab_size:
            return logits
        column = torch.arange(start, start + local, device=logits.device)
        return logits.masked_fill(column >= extras.vocab_size, torch.finfo(logits.dtype).min)


def gather_vocab_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits from vocab-parallel ones, padding trimmed (tests and debugging only)."""
    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return full[..., :vocab_size]
