"""Builds `cpu.c` with the system C compiler on first use and exposes its kernels.

The shared library is cached under a directory the caller passes, named by a hash of the
source and flags, and written atomically so concurrent workers can share the cache. Without
a compiler, on a CPU without AVX-512 or off x86-64 Linux, `load_cpu_kernels` returns None and
callers keep torch's ops; a kernel therefore never is the only way to run a model.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from epdserve.kernels.decode_batch import DecodeBatch
from epdserve.kernels.linear import FastLinear, Gemm, LinearChooser, float32_cpu, onednn_gemm
from epdserve.utils.files import atomic_target

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu.c")
# No FMA contraction: `rotary` then rounds as transformers' separate multiplies and add.
FLAGS = ("-O3", "-mavx512f", "-mfma", "-ffp-contract=off", "-shared", "-fPIC")
PANEL = 16

_P, _I = ctypes.c_void_p, ctypes.c_int64


class CpuKernels:
    """ctypes bindings of the compiled `cpu.c`; float32 CPU tensors only.

    `linear` and `replace_linears` run each float32 linear through the fastest of torch's
    own, oneDNN and the panel kernel here (see `epdserve.kernels.linear`).
    """

    def __init__(self, path: Path):
        # The picks depend on the machine and on this kernel's build, which names the library.
        self.chooser = LinearChooser(
            {"panels": self.panel_gemm, "onednn": onednn_gemm},
            picks_file=path.with_name(f"{path.stem}-linear-picks.json"),
        )
        self.lib = ctypes.CDLL(str(path))
        self.lib.pack_weight.argtypes = [_P, _P, _I, _I]
        self.lib.pack_weight.restype = None
        self.lib.linear.argtypes = [_P, _P, _P, _I, _I, _I]
        self.lib.linear.restype = None
        self.lib.paged_decode_attention.argtypes = [
            _P,
            _I,
            _P,
            _P,
            _P,
            _I,
            _P,
            _P,
            _I,
            _I,
            _I,
            _I,
            _I,
            ctypes.c_float,
            _P,
            _I,
        ]
        self.lib.paged_decode_attention.restype = ctypes.c_int
        self.lib.rms_norm.argtypes = [_P, _P, _P, _I, _I, ctypes.c_float]
        self.lib.rotary.argtypes = [_P, _P, _P, _P, _I, _I, _I]
        self.lib.silu_mul.argtypes = [_P, _P, _P, _I]
        for name in ("rms_norm", "rotary", "silu_mul"):
            getattr(self.lib, name).restype = None

    supports = staticmethod(float32_cpu)

    def pack_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """[N, K] -> panels [ceil(N/16), K, 16] (W^T in 16-column slices, zero-padded), flat."""
        weight = weight.contiguous()
        n, k = weight.shape
        out = torch.empty(-(-n // PANEL) * PANEL * k)
        self.lib.pack_weight(weight.data_ptr(), out.data_ptr(), n, k)
        return out

    def panel_gemm(self, module: torch.nn.Linear) -> Gemm:
        """`module` through the `linear` kernel over its weight packed in panels (a copy):
        one thread, all rows in registers at 24 a pass, each weight read once per pass."""
        packed = self.pack_weight(module.weight.detach())
        n, k = module.weight.shape
        bias = module.bias

        def gemm(x: torch.Tensor) -> torch.Tensor:
            y = torch.empty(x.shape[0], n)
            self.lib.linear(x.data_ptr(), packed.data_ptr(), y.data_ptr(), x.shape[0], n, k)
            return y if bias is None else y.add_(bias)

        return gemm

    def linear(self, module: torch.nn.Linear) -> FastLinear | torch.nn.Linear:
        """`module` through this machine's fastest GEMMs, or itself (see `LinearChooser`)."""
        return self.chooser.linear(module)

    def replace_linears(self, tree: torch.nn.Module) -> None:
        """Swap the `nn.Linear`s of a `transformers` module tree for fast ones."""
        self.chooser.replace_linears(tree)

    def decode_attention(
        self,
        q: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        batch: DecodeBatch,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """Attention of the one-query rows `batch.rows` of q [N, Hq, D] to their paged
        contexts in one layer's cache [blocks, block_size, Hkv, D], written into the same
        rows of `out` [N, Hq, D]. q and out contiguous; D a multiple of 16."""
        _, block_size, num_kv_heads, head_dim = cache_k.shape
        status = self.lib.paged_decode_attention(
            q.data_ptr(),
            q.stride(0),
            cache_k.data_ptr(),
            cache_v.data_ptr(),
            batch.block_tables.data_ptr(),
            batch.block_tables.shape[1],
            batch.context_len.data_ptr(),
            batch.rows.data_ptr(),
            batch.rows.shape[0],
            q.shape[1],
            num_kv_heads,
            head_dim,
            block_size,
            scale,
            out.data_ptr(),
            out.stride(0),
        )
        if status:
            raise MemoryError("paged_decode_attention: out of memory")

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """LlamaRMSNorm of x [N, H] with weight [H], in one pass."""
        x = x.contiguous()
        out = torch.empty_like(x)
        self.lib.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
        return out

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`apply_rotary_pos_emb` of x [N, heads, D] with cos, sin [N, D], bit for bit."""
        x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
        out = torch.empty_like(x)
        self.lib.rotary(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), *x.shape)
        return out

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up, elementwise, in one pass."""
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        self.lib.silu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel())
        return out

    def supports_attention(self, q: torch.Tensor, cache_k: torch.Tensor) -> bool:
        return (
            self.supports(cache_k)
            and q.dtype == torch.float32
            and q.shape[-1] % 16 == 0
            and q.is_contiguous()
            and cache_k.is_contiguous()
        )


def _has_avx512() -> bool:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def _build(cache_dir: Path) -> Path:
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_dir / f"cpu-{digest}.so"
    if target.exists():
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:  # atomic: a concurrent builder never loads a half-written file
        with atomic_target(target, suffix=".so") as tmp:
            subprocess.run(
                [compiler, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"], check=True, capture_output=True, text=True
            )
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"compiling {SOURCE.name} failed: {exc.stderr.strip()[-2000:]}") from exc
    return target


def load_cpu_kernels(cache_dir: str | Path) -> CpuKernels | None:
    """The kernels, built into `cache_dir` if needed; None (logged) where they cannot run."""
    if not _has_avx512():
        log.info("CPU kernels off: this CPU has no AVX-512")
        return None
    try:
        return CpuKernels(_build(Path(cache_dir)))
    except (RuntimeError, OSError) as exc:
        log.warning("CPU kernels off, using torch ops: %s", exc)
        return None
