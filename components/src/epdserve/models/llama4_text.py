"""Paged forward of the Llama 4 text decoder, over the modules of a `transformers` model.

The weights and sub-modules (norms, projections, qk-norm, rotary table, the MoE and dense
feed-forwards) are the loaded `Llama4TextModel`'s own; only the attention plumbing is ours,
so each op runs as `Llama4TextAttention` / `Llama4TextDecoderLayer` run it and greedy outputs
stay equal to `generate()` (logits to float rounding: see `epdserve.attention.paged`).

Per layer, as `transformers` does: RoPE layers (`no_rope_layers[i] == 1`) rotate q and k with
the complex (interleaved-pair) rotary and then L2-normalise them (`use_qk_norm`); NoPE layers
skip both and, with `attn_temperature_tuning`, scale the queries by
``1 + attn_scale * log1p(floor((position + 1) / floor_scale))``. MoE layers
(`config.moe_layers`) and dense layers run their `feed_forward` module on the packed rows: it
treats rows independently (the router picks each row's experts), so packing changes nothing.

Chunked (local) attention is not implemented: RoPE layers attend to every earlier position.
That equals `transformers` only below `attention_chunk_size` positions, which is why the
family caps its context length there (`Llama4Family.context_length`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama4.modeling_llama4 import Llama4TextAttention, Llama4TextDecoderLayer, Llama4TextModel

from epdserve.attention.kv_cache import KVCache
from epdserve.attention.paged import AttentionMetadata, paged_attention, write_kv
from epdserve.kernels.cpu import CpuKernels


class PagedLlama4Text:
    """A `Llama4TextModel` (+ lm_head) run over packed sequence chunks with a paged KV cache.

    Call under `torch.inference_mode()`. Hidden size H, vocabulary V, N packed tokens, head
    dim D. With `kernels`, float32 attention projections and the lm_head of few rows and
    one-query attention run through them; the feed-forwards stay `transformers`' modules.
    """

    def __init__(self, decoder: Llama4TextModel, lm_head: nn.Linear, kernels: CpuKernels | None = None):
        self.decoder = decoder
        self.kernels = kernels
        self.config = decoder.config
        self.dtype = decoder.embed_tokens.weight.dtype
        self.device = decoder.embed_tokens.weight.device
        wrap = kernels.linear if kernels is not None else (lambda module: module)
        self.lm_head = wrap(lm_head)
        self.proj = [
            tuple(
                wrap(m)
                for m in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                    layer.self_attn.o_proj,
                )
            )
            for layer in decoder.layers
        ]
        self.num_layers = len(decoder.layers)
        self.num_kv_heads = self.config.num_key_value_heads
        self.head_dim = decoder.layers[0].self_attn.head_dim

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[N] token ids -> [N, H] input embeddings."""
        return self.decoder.embed_tokens(token_ids)

    def allocate_cache(self, num_blocks: int, block_size: int) -> KVCache:
        """An empty cache of `num_blocks` blocks in this model's shapes, dtype and device."""
        return KVCache.allocate(
            self.num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim, self.dtype, self.device
        )

    def forward(self, inputs_embeds: torch.Tensor, meta: AttentionMetadata, kv: KVCache) -> torch.Tensor:
        """[N, H] embeddings of the packed chunks -> [M, H] final-norm hidden states of the
        rows `meta.output_rows`; writes the chunks' K/V into `kv`."""
        hidden = inputs_embeds
        # [N, D/2] complex rotations, computed as for transformers' [batch=1, seq=N].
        freqs = self.decoder.rotary_emb(hidden, meta.positions[None])[0]
        for i in range(self.num_layers):
            # Past the last layer's K/V only the output rows matter (as in `PagedLlama`).
            hidden = self._layer(i, hidden, freqs, meta, kv.key[i], kv.value[i], outputs_only=i == self.num_layers - 1)
        return self.decoder.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[M, H] final hidden states -> [M, V] float32 logits."""
        return self.lm_head(hidden).float()

    def _layer(
        self,
        index: int,
        hidden: torch.Tensor,
        freqs: torch.Tensor,
        meta: AttentionMetadata,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        outputs_only: bool = False,
    ) -> torch.Tensor:
        """Decoder layer `index` on [N, H] rows (freqs [N, D/2]) -> [N, H], or [M, H] at
        `meta.output_rows` with `outputs_only`."""
        layer: Llama4TextDecoderLayer = self.decoder.layers[index]
        attn = layer.self_attn
        q_proj, k_proj, v_proj, o_proj = self.proj[index]
        normed = layer.input_layernorm(hidden)
        k = self._position(attn, k_proj(normed), freqs, meta.positions, query=False)
        write_kv(k, v_proj(normed).view(k.shape), cache_k, cache_v, meta)
        positions = meta.positions
        if outputs_only and meta.outputs is not None:  # from here on, the output rows alone
            rows = meta.output_rows
            hidden, normed, freqs, positions = hidden[rows], normed[rows], freqs[rows], positions[rows]
            meta = meta.outputs
        q = self._position(attn, q_proj(normed), freqs, positions, query=True)
        attended = paged_attention(q, cache_k, cache_v, meta, attn.scaling, self.kernels)
        hidden = hidden + o_proj(attended.flatten(1))
        ff = layer.feed_forward(layer.post_attention_layernorm(hidden))
        if layer.is_moe_layer:  # Llama4TextMoe returns (output, router logits)
            ff = ff[0]
        return hidden + ff.view(hidden.shape)

    def _position(
        self, attn: Llama4TextAttention, x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, query: bool
    ) -> torch.Tensor:
        """[N, heads * D] query or key projections -> [N, heads, D] as `Llama4TextAttention`
        prepares them: rotary + qk-norm on RoPE layers, temperature tuning of the queries on
        NoPE layers (`positions` [N]: absolute positions)."""
        x = x.unflatten(-1, (-1, self.head_dim))
        if attn.use_rope:  # transformers' apply_rotary_emb, for one tensor
            pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            x = torch.view_as_real(pairs * freqs[:, None, :]).flatten(2).type_as(x)
        if hasattr(attn, "qk_norm"):
            x = attn.qk_norm(x)
        if query and attn.attn_temperature_tuning and not attn.use_rope:
            scales = torch.log1p(torch.floor((positions.float() + 1.0) / attn.floor_scale)) * attn.attn_scale + 1.0
            x = (x * scales[:, None, None]).to(x.dtype)
        return x
