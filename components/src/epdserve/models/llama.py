"""Paged forward of a Llama-family text decoder, over the modules of a `transformers` model.

The weights and sub-modules (norms, projections, MLP, rotary embedding) are the loaded
`LlamaModel`'s own; only the attention plumbing is ours, so each op runs as `transformers`
runs it and greedy outputs stay equal to its `generate()` (logits to float rounding: see
`epdserve.models.paged`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel, rotate_half

from epdserve.models.paged import AttentionMetadata, KVCache, paged_attention, write_kv


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
        """[N, H] embeddings of the packed chunks -> [M, H] final-norm hidden states of the
        rows `meta.output_rows`; writes the chunks' K/V into `kv`."""
        hidden = inputs_embeds
        # [1, N, D] like transformers' [batch, seq, D]; elementwise, so packing changes nothing.
        cos, sin = (t[0] for t in self.decoder.rotary_emb(hidden, meta.positions[None]))
        last = self.num_layers - 1
        for i, layer in enumerate(self.decoder.layers[:last]):
            hidden = self._layer(layer, hidden, cos, sin, meta, kv.key[i], kv.value[i])
        # Past the last layer's K/V only the output rows matter: a prompt chunk computes its
        # queries, attention and MLP there for its last token alone.
        hidden = self._layer(self.decoder.layers[last], hidden, cos, sin, meta, kv.key[last], kv.value[last],
                             outputs_only=True)
        return self.decoder.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[M, H] final hidden states -> [M, V] float32 logits."""
        return self.lm_head(hidden).float()

    def _layer(self, layer: LlamaDecoderLayer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               meta: AttentionMetadata, cache_k: torch.Tensor, cache_v: torch.Tensor,
               outputs_only: bool = False) -> torch.Tensor:
        """One `LlamaDecoderLayer` on [N, H] rows (cos, sin [N, D]) -> [N, H], or [M, H] at
        `meta.output_rows` with `outputs_only`."""
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        k = self._rotate(attn.k_proj(normed), cos, sin)
        write_kv(k, attn.v_proj(normed).view(k.shape), cache_k, cache_v, meta)
        if outputs_only and meta.outputs is not None:   # from here on, the output rows alone
            rows = meta.output_rows
            hidden, normed, cos, sin = hidden[rows], normed[rows], cos[rows], sin[rows]
            meta = meta.outputs
        q = self._rotate(attn.q_proj(normed), cos, sin)
        hidden = hidden + attn.o_proj(paged_attention(q, cache_k, cache_v, meta, attn.scaling).flatten(1))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[N, heads * D] projections -> [N, heads, D] with rotary embedding, computed as
        `apply_rotary_pos_emb` does; cos/sin [N, D] broadcast over the heads."""
        x = x.unflatten(-1, (-1, self.head_dim))
        cos, sin = cos[:, None], sin[:, None]
        return (x * cos) + (rotate_half(x) * sin)
