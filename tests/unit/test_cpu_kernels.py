"""epdserve's CPU kernels against torch's ops: linear layers and paged decode attention."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from epdserve.attention.paged import AttentionMetadata, paged_attention
from epdserve.kernels import cpu, linear
from epdserve.kernels.cpu import CpuKernels, load_cpu_kernels


@pytest.fixture(scope="module")
def kernels(cpu_kernels: CpuKernels | None) -> CpuKernels:
    found = cpu_kernels
    if found is None:
        pytest.skip("CPU kernels unavailable here (no AVX-512 or no C compiler)")
    return found


ROW_COUNTS = (1, 5, 24, 25, linear.FEW_ROWS, linear.FEW_ROWS + 1, 300)


@pytest.mark.parametrize("n,k,bias", [(16, 16, False), (20, 80, True), (37, 64, False), (1376, 512, False),
                                      (512, 1376, True)])
def test_every_gemm_matches_torch(kernels: CpuKernels, n: int, k: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(n * k)
    module = torch.nn.Linear(k, n, bias=bias)
    gemms = {"panels": kernels.panel_gemm(module), "onednn": linear.onednn_gemm(module)}
    if gemms["onednn"] is None:
        del gemms["onednn"]   # torch built without oneDNN
    for m in ROW_COUNTS:
        x = torch.randn(m, k, generator=gen)
        with torch.inference_mode():
            for name, gemm in gemms.items():
                torch.testing.assert_close(gemm(x), module(x), rtol=1e-5, atol=1e-4, msg=lambda s: f"{name}: {s}")


def _sleepy(slow_when_few: bool, timed: list[int]) -> linear.Gemm:
    """A GEMM 2 ms slow on few-row (or on many-row) inputs; records the rows it is timed on."""
    def gemm(x: torch.Tensor) -> torch.Tensor:
        timed.append(x.shape[0])
        if (x.shape[0] <= linear.FEW_ROWS) == slow_when_few:
            time.sleep(0.002)
        return torch.zeros(x.shape[0], 7)
    return gemm


def test_chooser_takes_the_fastest_per_kind_of_call_once_per_shape() -> None:
    timed: list[int] = []
    few_fast, many_fast = _sleepy(False, timed), _sleepy(True, timed)
    built: list[str] = []

    def factory(name: str, gemm: linear.Gemm):
        return lambda module: built.append(name) or gemm

    chooser = linear.LinearChooser({"few_fast": factory("few", few_fast), "many_fast": factory("many", many_fast),
                                    "absent": lambda module: None})
    module = torch.nn.Linear(3, 7)
    module.forward = lambda x: time.sleep(0.004) or torch.zeros(x.shape[0], 7)   # torch's own: slowest
    fast = chooser.linear(module)
    assert isinstance(fast, linear.FastLinear) and fast.few is few_fast and fast.many is many_fast
    assert set(timed) == set(linear.TIMING_ROWS)
    timed.clear()
    built.clear()
    again = chooser.linear(torch.nn.Linear(3, 7))   # the same shape: not timed again
    assert not timed and again.few is few_fast and again.many is many_fast
    assert sorted(built) == ["few", "many"]
    chooser.linear(torch.nn.Linear(3, 8))   # another shape is timed anew
    assert timed
    assert chooser.linear(torch.nn.Linear(3, 7).to(torch.bfloat16)).__class__ is torch.nn.Linear  # float32 only


def test_chooser_picks_persist_across_processes(tmp_path: Path) -> None:
    timed: list[int] = []
    factories = {"few_fast": lambda m: _sleepy(False, timed), "many_fast": lambda m: _sleepy(True, timed)}
    picks = tmp_path / "picks.json"
    module = torch.nn.Linear(3, 7)
    module.forward = lambda x: time.sleep(0.004) or torch.zeros(x.shape[0], 7)
    linear.LinearChooser(factories, picks_file=picks).linear(module)
    assert timed and picks.exists()
    timed.clear()
    fresh = linear.LinearChooser(factories, picks_file=picks).linear(torch.nn.Linear(3, 7))   # "another process"
    assert not timed and isinstance(fresh, linear.FastLinear)
    picks.write_text("not json")   # unreadable: timed again, not an error
    linear.LinearChooser(factories, picks_file=picks).linear(module)
    assert timed


def test_fast_linear_leaves_other_inputs_to_torch(kernels: CpuKernels) -> None:
    module = torch.nn.Linear(32, 48)
    fast = linear.FastLinear(module, kernels.panel_gemm(module), kernels.panel_gemm(module))
    x = torch.randn(2, 3, 32)   # not [M, K]: the module's own path
    with torch.inference_mode():
        assert torch.equal(fast(x), module(x))
        strided = x[0].t().contiguous().t()
        assert torch.equal(fast(strided), module(strided))


def test_replace_linears_in_a_module_tree(kernels: CpuKernels, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    """Every float32 nn.Linear of a tree runs through the kernels; [..., K] inputs work."""
    monkeypatch.setattr(linear, "fastest", lambda gemms, rows, k, evict: ("panels", {}))
    lib = tmp_path / Path(kernels.lib._name).name
    shutil.copy(kernels.lib._name, lib)
    kernels = CpuKernels(lib)   # a fresh chooser and picks file: no choices timed before
    torch.manual_seed(0)
    tree = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Sequential(torch.nn.Linear(128, 64)))
    x = torch.randn(2, 70, 64)
    with torch.inference_mode():
        expected = tree(x)
        kernels.replace_linears(tree)
        assert len(_inners(tree)) == 2
        assert not any(type(m) is torch.nn.Linear for m in tree.modules() if m not in _inners(tree))
        torch.testing.assert_close(tree(x), expected, rtol=1e-5, atol=1e-5)
    assert len(list(tree.parameters())) == 4   # the weights stay in the tree


def _inners(tree: torch.nn.Module) -> list[torch.nn.Module]:
    return [m.inner for m in tree.modules() if isinstance(m, linear.FastLinearModule)]


@pytest.mark.parametrize("heads,kv_heads,dim,block", [(8, 4, 64, 16), (4, 4, 16, 4), (8, 1, 128, 32), (6, 2, 32, 5)])
def test_decode_attention_matches_sdpa(kernels: CpuKernels, heads: int, kv_heads: int, dim: int,
                                       block: int) -> None:
    """Scattered, shared and partly filled blocks; decode rows between prompt chunks."""
    gen = torch.Generator().manual_seed(heads * dim + block)
    num_blocks = 200
    cache_k = torch.randn(num_blocks, block, kv_heads, dim, generator=gen)
    cache_v = torch.randn(num_blocks, block, kv_heads, dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    shared = order[:3]
    chunks = []   # (table, start, query_len): one-query chunks with prompt chunks between
    for i, context in enumerate((1, block, 3 * block + 1, 40, 7, 2 * block)):
        own = order[3 + 20 * i: 3 + 20 * (i + 1)]
        table = (shared + own) if context > 3 * block else own
        chunks.append((table, context - 1, 1))
        if i % 2:
            chunks.append((order[150 + i: 151 + i], 0, 1 + i % block))
    meta = AttentionMetadata.build(chunks, block)
    q = torch.randn(sum(n for *_, n in chunks), heads, dim, generator=gen)
    scale = dim ** -0.5
    reference = paged_attention(q, cache_k, cache_v, meta, scale)
    ours = paged_attention(q, cache_k, cache_v, meta, scale, kernels)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_unsupported_head_dim_uses_torch(kernels: CpuKernels) -> None:
    meta = AttentionMetadata.build([([0, 1], 5, 1)], 4)
    cache = torch.randn(2, 4, 1, 20)
    q = torch.randn(1, 2, 20)
    assert not kernels.supports_attention(q, cache)
    assert torch.equal(paged_attention(q, cache, cache, meta, 0.2, kernels), paged_attention(q, cache, cache, meta, 0.2))


def test_build_is_cached_and_failures_fall_back(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                kernels: CpuKernels) -> None:
    first = cpu._build(tmp_path)
    assert cpu._build(tmp_path) == first and list(tmp_path.iterdir()) == [first]   # no temp files left
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C")
    monkeypatch.setattr(cpu, "SOURCE", broken)
    assert load_cpu_kernels(tmp_path / "other") is None
    assert not list((tmp_path / "other").iterdir())


def test_elementwise_kernels_match_transformers(kernels: CpuKernels) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(7)
    norm = LlamaRMSNorm(80, eps=1e-5)
    norm.weight.data = torch.randn(80, generator=gen)
    x = torch.randn(37, 80, generator=gen) * 3
    with torch.inference_mode():
        torch.testing.assert_close(kernels.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x),
                                   rtol=1e-6, atol=1e-6)
        q = torch.randn(37, 3, 20, generator=gen)
        cos, sin = torch.randn(37, 20, generator=gen), torch.randn(37, 20, generator=gen)
        # transformers' layout: [batch, heads, seq, D] with cos/sin [batch, seq, D]
        expected, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], cos[None], sin[None])
        assert torch.equal(kernels.rotary(q, cos, sin), expected[0].transpose(0, 1))
        gate, up = torch.randn(5, 37, generator=gen) * 4, torch.randn(5, 37, generator=gen)
        torch.testing.assert_close(kernels.silu_mul(gate, up), F.silu(gate) * up, rtol=1e-6, atol=1e-6)
