"""Paged forward of a Llama-family text decoder, over the modules of a `transformers` model.

The weights and sub-modules (norms, projections, MLP, rotary embedding) are the loaded
`LlamaModel`'s own; only the attention plumbing is ours, so each op runs as `transformers`
runs it and greedy outputs stay equal to its `generate()`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaModel, apply_rotary_pos_emb

from epdserve.models.paged import AttentionMetadata, KVCache, paged_attention


class PagedLlama:
    """A `LlamaModel` (+ lm_head) run over packed sequence chunks with a paged KV cache.

    Call under `torch.inference_mode()`. Hidden size H, vocabulary V, N packed tokens.
    """

    def __init__(self, decoder: LlamaModel, lm_head: nn.Linear):
        self.decoder = decoder
        self.lm_head = lm_head
        config = decoder.config
        attn = decoder.layers[0].self_attn
        self.num_layers = len(decoder.layers)
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.dtype = decoder.embed_tokens.weight.dtype
        self.device = decoder.embed_tokens.weight.device

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[N] token ids -> [N, H] input embeddings."""
        return self.decoder.embed_tokens(token_ids)

    def allocate_cache(self, num_blocks: int, block_size: int) -> KVCache:
        """An empty cache of `num_blocks` blocks in this model's shapes, dtype and device."""
        return KVCache.allocate(self.num_layers, num_blocks, block_size, self.num_kv_heads,
                                self.head_dim, self.dtype, self.device)

    def forward(self, inputs_embeds: torch.Tensor, meta: AttentionMetadata,
                kv: KVCache) -> torch.Tensor:
        """[N, H] embeddings of the packed chunks -> [N, H] final-norm hidden states; writes the
        chunks' K/V into `kv`."""
        hidden = inputs_embeds
        # [1, N, D] like transformers' [batch, seq, D]; elementwise, so packing changes nothing.
        cos, sin = self.decoder.rotary_emb(hidden, meta.positions[None])
        for i, layer in enumerate(self.decoder.layers):
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            hidden = residual + self._attention(
                layer.self_attn, hidden, cos[0], sin[0], meta, kv.key[i], kv.value[i])
            residual = hidden
            hidden = layer.post_attention_layernorm(hidden)
            hidden = residual + layer.mlp(hidden)
        return self.decoder.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[M, H] final hidden states -> [M, V] float32 logits."""
        return self.lm_head(hidden).float()

    def _attention(self, attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, meta: AttentionMetadata, cache_k: torch.Tensor,
                   cache_v: torch.Tensor) -> torch.Tensor:
        """One `LlamaAttention` on [N, H] rows; cos, sin [N, D]."""
        rows = (hidden.shape[0], -1, self.head_dim)
        q = attn.q_proj(hidden).view(rows)
        k = attn.k_proj(hidden).view(rows)
        v = attn.v_proj(hidden).view(rows)
        # Heads on dim 1 of [N, heads, D]: cos/sin unsqueeze there to broadcast over heads.
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        out = paged_attention(q, k, v, cache_k, cache_v, meta, attn.scaling)
        return attn.o_proj(out.view(hidden.shape[0], -1))
