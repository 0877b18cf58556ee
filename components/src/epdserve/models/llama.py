"""Paged forward of a Llama-architecture text decoder, over the modules of a `transformers` model.

The weights and sub-modules (norms, projections, MLP, rotary embedding) are the loaded
model's own; only the attention plumbing is ours, so each op runs as `transformers` runs it
and greedy outputs stay equal to its `generate()` (logits to float rounding: see
`epdserve.attention.paged`). The decoders of the same layout run here too: Qwen2's (q/k/v
biases live in the projections), Qwen3's (per-head q/k RMSNorm before the rotary), rotary
tables of several position axes (M-RoPE: `meta.rope_positions`), and Qwen3-VL's deepstack
(media features added to the first layers' outputs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel, LlamaRMSNorm, rotate_half

from epdserve.attention.kv_cache import KVCache
from epdserve.attention.paged import AttentionMetadata, paged_attention, write_kv
from epdserve.kernels.cpu import CpuKernels

Linear = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Projections:
    """One decoder layer's linear maps, each its `nn.Linear` or a kernel-backed stand-in."""

    q: Linear
    k: Linear
    v: Linear
    o: Linear
    gate: Linear
    up: Linear
    down: Linear


class PagedLlama:
    """A `LlamaModel` (+ lm_head) run over packed sequence chunks with a paged KV cache.

    Call under `torch.inference_mode()`. Hidden size H, vocabulary V, N packed tokens.
    With `kernels`, float32 projections of few rows and one-query attention run through them.
    """

    def __init__(
        self, decoder: LlamaModel, lm_head: nn.Linear, kernels: CpuKernels | None = None, deepstack_layers: int = 0
    ):
        """`deepstack_layers` K > 0: input rows are (1 + K) * H wide, the input embedding then
        K rows of H added to the outputs of layers 0 .. K-1 (zeros for text tokens)."""
        self.decoder = decoder
        self.deepstack_layers = deepstack_layers
        self.kernels = kernels
        self.dtype = decoder.embed_tokens.weight.dtype
        self.device = decoder.embed_tokens.weight.device
        # The elementwise kernels take float32 CPU tensors; LlamaMLP's act_fn must be SiLU.
        self.fused = kernels if kernels is not None and kernels.supports(decoder.embed_tokens.weight) else None
        self.fused_mlp = self.fused if decoder.config.hidden_act == "silu" else None  # the kernels for the MLP
        wrap = kernels.linear if kernels is not None else (lambda module: module)
        self.lm_head = wrap(lm_head)
        self.proj = [
            _Projections(
                wrap(layer.self_attn.q_proj),
                wrap(layer.self_attn.k_proj),
                wrap(layer.self_attn.v_proj),
                wrap(layer.self_attn.o_proj),
                wrap(layer.mlp.gate_proj),
                wrap(layer.mlp.up_proj),
                wrap(layer.mlp.down_proj),
            )
            for layer in decoder.layers
        ]
        config = decoder.config
        attn = decoder.layers[0].self_attn
        self.num_layers = len(decoder.layers)
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = attn.head_dim

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[N] token ids -> [N, (1 + deepstack_layers) * H] input embeddings."""
        rows = self.decoder.embed_tokens(token_ids)
        if not self.deepstack_layers:
            return rows
        return torch.cat([rows, rows.new_zeros(rows.shape[0], self.deepstack_layers * rows.shape[1])], dim=1)

    def allocate_cache(self, num_blocks: int, block_size: int) -> KVCache:
        """An empty cache of `num_blocks` blocks in this model's shapes, dtype and device."""
        return KVCache.allocate(
            self.num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim, self.dtype, self.device
        )

    def forward(self, inputs_embeds: torch.Tensor, meta: AttentionMetadata, kv: KVCache) -> torch.Tensor:
        """[N, H] embeddings of the packed chunks -> [M, H] final-norm hidden states of the
        rows `meta.output_rows`; writes the chunks' K/V into `kv`."""
        hidden, deepstack = inputs_embeds, None
        if self.deepstack_layers:
            deepstack = inputs_embeds.unflatten(1, (1 + self.deepstack_layers, -1))
            hidden = deepstack[:, 0]
        # [1, N, D] like transformers' [batch, seq, D] ([A, 1, N] positions for A axes);
        # elementwise, so packing changes nothing.
        positions = meta.positions if meta.rope_positions is None else meta.rope_positions
        cos, sin = (t[0] for t in self.decoder.rotary_emb(hidden, positions.unsqueeze(-2)))
        for i in range(self.num_layers):
            # Past the last layer's K/V only the output rows matter: a prompt chunk computes
            # its queries, attention and MLP there for its last token alone.
            last = i == self.num_layers - 1
            hidden = self._layer(i, hidden, cos, sin, meta, kv.key[i], kv.value[i], outputs_only=last)
            if deepstack is not None and i < self.deepstack_layers:
                # transformers adds them at media positions only; + 0 elsewhere changes nothing.
                rows = deepstack[:, 1 + i]
                hidden = hidden + (rows[meta.output_rows] if last and meta.outputs is not None else rows)
        return self._norm(self.decoder.norm, hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[M, H] final hidden states -> [M, V] float32 logits."""
        return self.lm_head(hidden).float()

    def _layer(
        self,
        index: int,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        outputs_only: bool = False,
    ) -> torch.Tensor:
        """Decoder layer `index` on [N, H] rows (cos, sin [N, D]) -> [N, H], or [M, H] at
        `meta.output_rows` with `outputs_only`."""
        layer: LlamaDecoderLayer = self.decoder.layers[index]
        proj = self.proj[index]
        normed = self._norm(layer.input_layernorm, hidden)
        attn = layer.self_attn
        k = self._rotate(proj.k(normed), cos, sin, getattr(attn, "k_norm", None))
        write_kv(k, proj.v(normed).view(k.shape), cache_k, cache_v, meta)
        if outputs_only and meta.outputs is not None:  # from here on, the output rows alone
            rows = meta.output_rows
            hidden, normed, cos, sin = hidden[rows], normed[rows], cos[rows], sin[rows]
            meta = meta.outputs
        q = self._rotate(proj.q(normed), cos, sin, getattr(attn, "q_norm", None))
        attended = paged_attention(q, cache_k, cache_v, meta, attn.scaling, self.kernels)
        hidden = hidden + proj.o(attended.flatten(1))
        # LlamaMLP.forward, with our projections
        normed = self._norm(layer.post_attention_layernorm, hidden)
        gate, up = proj.gate(normed), proj.up(normed)
        fused = self.fused_mlp
        return hidden + proj.down(fused.silu_mul(gate, up) if fused is not None else layer.mlp.act_fn(gate) * up)

    def _norm(self, norm: LlamaRMSNorm, hidden: torch.Tensor) -> torch.Tensor:
        """A LlamaRMSNorm module applied to [N, H] rows."""
        return norm(hidden) if self.fused is None else self.fused.rms_norm(hidden, norm.weight, norm.variance_epsilon)

    def _rotate(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_norm: nn.Module | None = None
    ) -> torch.Tensor:
        """[N, heads * D] projections -> [N, heads, D] with rotary embedding, computed as
        `apply_rotary_pos_emb` does; cos/sin [N, D] broadcast over the heads. `head_norm`:
        Qwen3's per-head RMSNorm, applied first."""
        x = x.unflatten(-1, (-1, self.head_dim))
        if head_norm is not None:
            x = head_norm(x)
        if self.fused is not None:
            return self.fused.rotary(x, cos, sin)
        cos, sin = cos[:, None], sin[:, None]
        return (x * cos) + (rotate_half(x) * sin)
