"""The paged Llama forward against `transformers` on tiny models: logits and greedy tokens.

Run with `-s` to see the max abs logit difference of each case. Greedy tokens must equal
`generate()` exactly; logits within a tolerance, because the paged forward reorders float
work that `transformers` does otherwise: packing several sequences into one forward changes
the row count of every matmul (BLAS kernels differ by M), a decode query attends with the
query heads of a KV head as rows of one call, a prompt's last layer runs for its last
token alone, and the CPU kernels sum in their own order. Each moves fp32 logits by ~1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import pytest
import torch
from transformers import AutoModelForImageTextToText, DynamicCache

from epdserve.attention.kv_cache import KVCache
from epdserve.attention.paged import AttentionMetadata
from epdserve.kernels.cpu import CpuKernels
from epdserve.models.llama import PagedLlama
from epdserve.tools.tiny_model import build_tiny_model

BLOCK = 4
STEPS = 10
PACKED_ATOL = 1e-4  # measured <= 1e-6 on the tiny fp32 models
MODELS = {
    "gqa": {},  # hidden 64, 4 heads, 2 kv heads: head_dim 16
    "mqa_hd20": {"hidden_size": 80, "num_heads": 4, "num_kv_heads": 1, "seed": 1},
    "mha": {"num_kv_heads": 4, "seed": 2},
}


@pytest.fixture(scope="module", params=list(MODELS))
def hf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    if not MODELS[request.param]:   # the builder's default: the session's tiny LLaVA
        path = request.getfixturevalue("tiny_llava")
    else:
        path = build_tiny_model("llava", tmp_path_factory.mktemp(request.param), **MODELS[request.param])
    return AutoModelForImageTextToText.from_pretrained(path).eval()


@pytest.fixture(scope="module", params=["torch-ops", "cpu-kernels"])
def kernels(request: pytest.FixtureRequest) -> CpuKernels | None:
    """Each case runs on torch's ops alone and with epdserve's CPU kernels."""
    if request.param == "torch-ops":
        return None
    found = request.getfixturevalue("cpu_kernels")
    if found is None:
        pytest.skip("CPU kernels unavailable here (no AVX-512 or no C compiler)")
    return found


@dataclass
class Seq:
    tokens: list[int]
    table: list[int] = field(default_factory=list)
    cached: int = 0  # positions already in the cache
    out: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


class Engine:
    """Drives PagedLlama as a serving engine would: a shuffled block pool, a table per
    sequence, several sequence chunks packed into each forward."""

    def __init__(self, hf, kernels: CpuKernels | None, num_blocks: int = 96):
        self.model = PagedLlama(hf.model.language_model, hf.lm_head, kernels)
        self.kv = self.model.allocate_cache(num_blocks, BLOCK)
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()

    def step(self, chunks: list[tuple[Seq, list[int]]]) -> torch.Tensor:
        """Run each (sequence, new tokens) chunk; [len(chunks), V] logits of their last tokens."""
        for seq, new in chunks:
            while len(seq.table) * BLOCK < seq.cached + len(new):
                seq.table.append(self.free.pop())
        meta = AttentionMetadata.build([(s.table, s.cached, len(new)) for s, new in chunks], BLOCK)
        ids = torch.tensor([t for _, new in chunks for t in new])
        hidden = self.model.forward(self.model.embed(ids), meta, self.kv)
        for seq, new in chunks:
            seq.cached += len(new)
        return self.model.logits(hidden)

    def decode(self, seqs: list[Seq], logits: torch.Tensor, steps: int = STEPS) -> None:
        """Greedy: take each sequence's next token from `logits`, then run them all together."""
        for step in range(steps):
            for seq, row in zip(seqs, logits):
                seq.logits.append(row)
                seq.out.append(int(row.argmax()))
            if step + 1 < steps:
                logits = self.step([(s, [s.out[-1]]) for s in seqs])


def hf_generate(hf, prompt: list[int], steps: int = STEPS) -> tuple[list[int], torch.Tensor]:
    """`generate()` greedy tokens (stopping after EOS) and their [n, V] float32 logits."""
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                      do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.stack([x[0].float() for x in out.logits])


def hf_chunked(hf, prompt: list[int], cuts: list[int],
               cache: DynamicCache | None = None) -> torch.Tensor:
    """[V] logits of the prompt's last token with `transformers` fed prompt[a:b] for each
    consecutive cut, appending to `cache` (which may already hold a prefix of the prompt)."""
    decoder = hf.model.language_model
    cache = cache if cache is not None else DynamicCache(config=decoder.config)
    bounds = [cache.get_seq_length(), *cuts, len(prompt)]
    for a, b in pairwise(bounds):
        hidden = decoder(input_ids=torch.tensor([prompt[a:b]]), past_key_values=cache,
                         use_cache=True).last_hidden_state
    return hf.lm_head(hidden[0, -1]).float()


def compare(case: str, seq: Seq, ref: tuple[list[int], torch.Tensor], hf) -> float:
    """Assert greedy tokens equal up to the reference's length; return the max logit diff."""
    tokens, logits = ref
    text = hf.config.text_config
    label = f"{text.num_attention_heads}q/{text.num_key_value_heads}kv heads of {text.head_dim}"
    assert seq.out[:len(tokens)] == tokens, case
    diff = (torch.stack(seq.logits[:len(tokens)]) - logits).abs().max().item()
    print(f"{case} [{label}]: prompt {len(seq.tokens)}, {len(tokens)} tokens, "
          f"max |logit diff| {diff:.3g}")
    return diff


def prompts(hf, lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    """Random prompts of `lengths` over non-special token ids."""
    gen = torch.Generator().manual_seed(seed)
    vocab = hf.config.text_config.vocab_size
    return [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in lengths]


@torch.inference_mode()
def test_single_sequence(hf, kernels) -> None:
    """(a) Prefill then decode steps, one sequence per forward."""
    for prompt in prompts(hf, (1, 6, 23)):
        engine, seq = Engine(hf, kernels), Seq(prompt)
        engine.decode([seq], engine.step([(seq, prompt)]))
        assert compare("single", seq, hf_generate(hf, prompt), hf) <= PACKED_ATOL


@torch.inference_mode()
def test_packed_prefill_and_decode(hf, kernels) -> None:
    """(b) Sequences of different lengths prefilled in one forward, then decoded together."""
    engine = Engine(hf, kernels)
    seqs = [Seq(p) for p in prompts(hf, (11, 23, 6, 1, 17), seed=1)]
    engine.decode(seqs, engine.step([(s, s.tokens) for s in seqs]))
    for seq in seqs:
        assert compare("packed", seq, hf_generate(hf, seq.tokens), hf) <= PACKED_ATOL


@torch.inference_mode()
def test_chunked_prefill(hf, kernels) -> None:
    """(c) A prompt prefilled in 3 chunks across 3 forwards, each packed with another
    sequence's decode step; the chunked logits equal transformers fed the same chunks."""
    engine = Engine(hf, kernels)
    prompt, other = prompts(hf, (22, 9), seed=2)
    seq, neighbour = Seq(prompt), Seq(other)
    engine.decode([neighbour], engine.step([(neighbour, other)]), steps=1)
    cuts = [7, 15]
    for a, b in pairwise([0, *cuts, len(prompt)]):
        logits = engine.step([(seq, prompt[a:b]), (neighbour, [neighbour.out[-1]])])
        engine.decode([neighbour], logits[1:], steps=1)
    alone = Engine(hf, kernels)  # the same chunks in forwards of their own: exactly transformers'
    lone = Seq(prompt)
    for a, b in pairwise([0, *cuts, len(prompt)]):
        lone_logits = alone.step([(lone, prompt[a:b])])[0]
    torch.testing.assert_close(lone_logits, hf_chunked(hf, prompt, cuts), rtol=0, atol=PACKED_ATOL)
    engine.decode([seq], logits[:1])
    assert compare("chunked", seq, hf_generate(hf, prompt), hf) <= PACKED_ATOL
    neighbour_ref = hf_generate(hf, other, steps=len(neighbour.out))
    assert compare("chunked neighbour", neighbour, neighbour_ref, hf) <= PACKED_ATOL


@torch.inference_mode()
def test_prefix_cache(hf, kernels) -> None:
    """(d) B reuses A's first full blocks and computes only its suffix; A's blocks stay
    intact (A decodes on correctly afterwards)."""
    engine = Engine(hf, kernels)
    a_prompt, b_suffix = prompts(hf, (19, 7), seed=3)
    shared = 3 * BLOCK
    b_prompt = a_prompt[:shared] + b_suffix
    a = Seq(a_prompt)
    a_first = engine.step([(a, a_prompt)])
    b = Seq(b_prompt, table=a.table[:shared // BLOCK], cached=shared)
    b_first = engine.step([(b, b_suffix)])[0]
    # transformers: prefill A, drop the cache past the shared prefix, feed B's suffix.
    cache = DynamicCache(config=hf.model.language_model.config)
    hf_chunked(hf, a_prompt, [], cache)
    cache.crop(shared - len(a_prompt))
    torch.testing.assert_close(b_first, hf_chunked(hf, b_prompt, [], cache), rtol=0, atol=PACKED_ATOL)
    engine.decode([a, b], torch.stack([a_first[0], b_first]))
    assert compare("prefix A", a, hf_generate(hf, a_prompt), hf) <= PACKED_ATOL
    assert compare("prefix B", b, hf_generate(hf, b_prompt), hf) <= PACKED_ATOL


def test_metadata_and_cache_shapes() -> None:
    meta = AttentionMetadata.build([([5, 2], 3, 3), ([7], 0, 2)], block_size=4)
    assert meta.positions.tolist() == [3, 4, 5, 0, 1]
    assert meta.slot_mapping.tolist() == [23, 8, 9, 28, 29]
    assert (meta.query_start, meta.query_len, meta.context_len) == ([0, 3], [3, 2], [6, 2])
    assert meta.output_rows.tolist() == [2, 4]   # each chunk's last token
    last = AttentionMetadata.build([([5, 2], 3, 3), ([7], 0, 2)], block_size=4, samples=[False, True])
    assert last.output_rows.tolist() == [4]
    assert (last.outputs.query_start, last.outputs.query_len, last.outputs.context_len) == ([0], [1], [2])
    decode = AttentionMetadata.build([([5, 2], 6, 1), ([7], 2, 1)], block_size=4)
    assert decode.outputs is None and decode.output_rows.tolist() == [0, 1]   # every row is an output
    kv = KVCache.allocate(3, 10, 4, 2, 16, torch.bfloat16, "cpu")
    assert len(kv.key) == len(kv.value) == 3 and kv.key[0].shape == (10, 4, 2, 16)
    assert (kv.block_size, kv.num_blocks) == (4, 10)
    assert KVCache.bytes_per_block(3, 4, 2, 16, torch.bfloat16) == 2 * 3 * 4 * 2 * 16 * 2


@torch.inference_mode()
def test_decode_over_block_runs(hf, kernels) -> None:
    """(e) A context held in two runs of consecutive blocks (a prefix-cache hit leaves the
    shared blocks apart from the sequence's own) is attended run by run and merged: the same
    tokens and logits as from one consecutive run."""
    prompt = prompts(hf, (300,), seed=4)[0]
    split, whole = Engine(hf, kernels, num_blocks=200), Engine(hf, kernels, num_blocks=200)
    split.free = (list(range(120, 160)) + list(range(100)))[::-1]   # popped from the end: 2 runs
    whole.free = list(range(200))[::-1]
    a, b = Seq(prompt), Seq(prompt)
    split.decode([a], split.step([(a, prompt)]), steps=4)
    whole.decode([b], whole.step([(b, prompt)]), steps=4)
    meta = AttentionMetadata.build([(a.table, a.cached, 1)], BLOCK)
    assert isinstance(meta.kv_blocks[0], list) and len(meta.kv_blocks[0]) == 2
    assert a.out == b.out
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=0, atol=PACKED_ATOL)


@torch.inference_mode()
def test_chunk_without_output_rows(hf, kernels) -> None:
    """(f) A prompt chunk that does not sample returns no rows but still writes its K/V: the
    next chunk's logits are transformers' for the same chunks."""
    engine = Engine(hf, kernels)
    prompt = prompts(hf, (14,), seed=5)[0]
    seq = Seq(prompt)
    while len(seq.table) * BLOCK < len(prompt):
        seq.table.append(engine.free.pop())
    first = AttentionMetadata.build([(seq.table, 0, 9)], BLOCK, samples=[False])
    hidden = engine.model.forward(engine.model.embed(torch.tensor(prompt[:9])), first, engine.kv)
    assert hidden.shape == (0, hf.config.text_config.hidden_size)
    seq.cached = 9
    logits = engine.step([(seq, prompt[9:])])[0]
    torch.testing.assert_close(logits, hf_chunked(hf, prompt, [9]), rtol=0, atol=PACKED_ATOL)
