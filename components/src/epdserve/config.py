"""Every command-line flag and environment variable of epdserve, parsed in one place.

Entry points call `parse_worker_args` / `parse_frontend_args` with `os.environ` and pass the
resulting dataclasses down; nothing else reads flags or the environment.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class Role(StrEnum):
    PROCESSOR = "processor"
    PD = "pd"  # encode (EPD) + prefill + decode
    PREFILL = "prefill"
    DECODE = "decode"
    ENCODE = "encode"
    ENCODE_PREFILL = "encode_prefill"
    NATIVE_ENCODER = "native_encoder"
    TEXT = "text"  # processor + PD in one process, no media


@dataclass(frozen=True)
class PlaneTimeouts:
    """The NATS request plane's deadlines and intervals, in seconds. Every process of a cluster
    must use the same `heartbeat_interval`: clients judge servers by it."""

    heartbeat_interval: float = 2.0  # a running handler tells its client it lives this often
    ack_timeout: float = 5.0  # a request no server acked by then found no server
    stream_idle_timeout: float = 30.0  # a stream to a processor silent this long has failed
    partial_ttl: float = 60.0  # an incomplete chunked message is dropped after this
    connect_timeout: float = 5.0  # the first connection to NATS
    drain_timeout: float = 30.0  # at shutdown, in-flight handlers are cancelled after this

    @property
    def dead_server_timeout(self) -> float:
        """A stream silent for three heartbeats: its server is dead."""
        return 3 * self.heartbeat_interval


@dataclass(frozen=True)
class RuntimeConfig:
    etcd_endpoints: str = "http://127.0.0.1:2379"
    nats_server: str = "nats://127.0.0.1:4222"
    namespace: str = "epdserve"
    lease_ttl: float = 10.0
    plane: PlaneTimeouts = PlaneTimeouts()


@dataclass(frozen=True)
class MediaConfig:
    """Where media may come from and how long fetching may take (seconds)."""

    image_fetch_timeout: float = 5.0
    video_fetch_timeout: float = 30.0
    audio_fetch_timeout: float = 10.0
    allow_redirects: bool = True
    allowed_domains: tuple[str, ...] = ()  # empty: any domain
    allowed_local_path: str | None = None  # file:// URLs only under this directory
    limit_per_prompt: Mapping[str, int] = field(default_factory=lambda: {"image": 4, "video": 1, "audio": 1})
    enable_mm_embeds: bool = False
    # Media processing options every request gets (`--mm-processor-kwargs`); a request's own
    # `mm_processor_kwargs` win key by key. The model family allows the keys and bounds them.
    mm_processor_kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TransferTimeouts:
    """Deadlines of the hand-offs between workers, in seconds."""

    read_timeout: float = 10.0  # one NIXL READ of embeddings or KV, the wait for staging room included
    # A PD/prefill worker waits this long for an encode worker's MediaDelivery; a backstop: the
    # processor cancels the request when its encode fails.
    encoder_result_timeout: float = 60.0
    embedding_hold_timeout: float = 30.0  # an encode worker pins embeddings this long for their READ
    kv_handoff_timeout: float = 30.0  # a prefill worker holds a prompt's KV this long for its READ
    # The handoff travels prefill worker -> processor -> decode worker, and the READ takes time
    # too: a decode worker starts no READ this close to the end of the holder's hold.
    kv_hold_margin: float = 1.0
    mailbox_ttl: float = 60.0  # a MediaDelivery nobody claims is dropped after this


@dataclass(frozen=True)
class WorkerConfig:
    role: Role
    model: str
    served_model_name: str
    enable_multimodal: bool
    runtime: RuntimeConfig
    media: MediaConfig
    kernel_cache_dir: str  # where built CPU kernels are kept; the parser's default follows $XDG_CACHE_HOME
    dtype: str = "auto"
    device: str = "auto"  # "auto": cuda when available, else cpu
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    ec_storage_path: str | None = None
    encoder_cache_bytes: int = 256 << 20  # encode worker: embedding cache, NIXL-registered
    embedding_buffer_bytes: int = 64 << 20  # PD/prefill worker: staging for embeddings it READs
    transfer: TransferTimeouts = TransferTimeouts()
    cpu_kernels: bool = True  # our AVX-512 kernels for float32 decode on CPU


@dataclass(frozen=True)
class FrontendConfig:
    runtime: RuntimeConfig
    http_host: str = "0.0.0.0"
    http_port: int = 8000


# Dynamo's role flags, each a multimodal role that needs --enable-multimodal.
_ROLE_FLAGS = {
    "multimodal_processor": Role.PROCESSOR,
    "multimodal_encode_worker": Role.ENCODE,
    "multimodal_worker": Role.PD,
    "multimodal_decode_worker": Role.DECODE,
    "multimodal_encode_prefill_worker": Role.ENCODE_PREFILL,
    "native_encoder_worker": Role.NATIVE_ENCODER,
}


# Timeout flags: flag -> (field of the timeouts dataclass, which holds the default; help).
_PLANE_FLAGS = {
    "--heartbeat-interval": (
        "heartbeat_interval",
        "a running request's heartbeat; three missed: its server is dead (same in every process)",
    ),
    "--request-ack-timeout": ("ack_timeout", "how long a server has to ack a request"),
    "--stream-idle-timeout": ("stream_idle_timeout", "how long a stream to a processor may be silent"),
    "--partial-message-ttl": ("partial_ttl", "how long an incomplete chunked message is kept"),
    "--nats-connect-timeout": ("connect_timeout", "the first connection to NATS"),
    "--drain-timeout": ("drain_timeout", "how long in-flight requests get at shutdown"),
}
_TRANSFER_FLAGS = {
    "--nixl-read-timeout": ("read_timeout", "bounds one NIXL READ"),
    "--encoder-result-timeout": (
        "encoder_result_timeout",
        "PD/prefill worker: how long a request waits for its encode worker's embeddings",
    ),
    "--embedding-hold-timeout": (
        "embedding_hold_timeout",
        "encode worker: how long embeddings stay pinned for their READ",
    ),
    "--kv-handoff-timeout": (
        "kv_handoff_timeout",
        "prefill worker: how long it keeps a prompt's KV blocks for a decode worker to READ before freeing them",
    ),
    "--kv-hold-margin": (
        "kv_hold_margin",
        "decode worker: no READ starts this close to the end of the prefill worker's hold",
    ),
    "--mailbox-ttl": ("mailbox_ttl", "an unclaimed embedding delivery is dropped after this"),
}


def _add_timeout_args(
    group: argparse._ArgumentGroup, defaults: PlaneTimeouts | TransferTimeouts, flags: dict[str, tuple[str, str]]
) -> None:
    for flag, (name, text) in flags.items():
        group.add_argument(flag, dest=name, type=float, default=getattr(defaults, name), help=f"seconds: {text}")


def _timeouts(args: argparse.Namespace, flags: dict[str, tuple[str, str]]) -> dict[str, float]:
    return {name: getattr(args, name) for name, _ in flags.values()}


def _add_runtime_args(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--etcd-endpoints", default=env.get("ETCD_ENDPOINTS", RuntimeConfig.etcd_endpoints))
    g.add_argument("--nats-server", default=env.get("NATS_SERVER", RuntimeConfig.nats_server))
    g.add_argument("--namespace", default=RuntimeConfig.namespace)
    g.add_argument(
        "--lease-ttl", type=float, default=RuntimeConfig.lease_ttl, help="seconds a dead instance stays discoverable"
    )
    _add_timeout_args(g, PlaneTimeouts(), _PLANE_FLAGS)


def _runtime(args: argparse.Namespace) -> RuntimeConfig:
    plane = PlaneTimeouts(**_timeouts(args, _PLANE_FLAGS))
    return RuntimeConfig(args.etcd_endpoints, args.nats_server, args.namespace, args.lease_ttl, plane)


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object like {"max_pixels": 1003520}')
    return value


def _json_limits(text: str) -> dict[str, int]:
    limits = json.loads(text)
    if not isinstance(limits, dict) or not all(isinstance(v, int) and v >= 0 for v in limits.values()):
        raise argparse.ArgumentTypeError('expected JSON like {"image": 4, "video": 1}')
    return limits


def _default_kernel_cache(env: Mapping[str, str]) -> str:
    cache = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME", "~")) / ".cache")
    return str(Path(cache).expanduser() / "epdserve" / "kernels")


def worker_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m epdserve.worker", description="Run one epdserve worker role.")
    roles = p.add_argument_group("role (none: a text-only processor + worker in one process)")
    for dest in _ROLE_FLAGS:
        roles.add_argument("--" + dest.replace("_", "-"), dest=dest, action="store_true")
    roles.add_argument(
        "--vllm-native-encoder-worker",
        dest="native_encoder_worker",
        action="store_true",
        help="Dynamo's name of --native-encoder-worker",
    )
    roles.add_argument("--is-prefill-worker", action="store_true")
    p.add_argument(
        "--enable-multimodal",
        action="store_true",
        help="required by every multimodal role; media requests are refused without it",
    )
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--served-model-name", default=None, help="default: --model as given")
    p.add_argument(
        "--dtype",
        default=WorkerConfig.dtype,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: the checkpoint's dtype, as transformers loads it",
    )
    p.add_argument("--device", default=WorkerConfig.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--block-size", type=int, default=WorkerConfig.block_size)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes")
    p.add_argument("--max-num-seqs", type=int, default=WorkerConfig.max_num_seqs)
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=WorkerConfig.max_num_batched_tokens,
        help="token budget of one engine step",
    )
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--limit-mm-per-prompt", type=_json_limits, default=None)
    p.add_argument("--allowed-media-domains", nargs="*", default=[])
    p.add_argument("--allowed-local-media-path", default=None)
    p.add_argument("--enable-mm-embeds", action="store_true")
    p.add_argument(
        "--mm-processor-kwargs",
        type=_json_object,
        default={},
        help='media processing options for every request, e.g. {"max_pixels": 1003520} (Qwen-VL); '
        "a request's mm_processor_kwargs win key by key",
    )
    p.add_argument(
        "--ec-storage-path",
        default=None,
        help="embedding cache on disk shared by a native encoder worker and PD workers",
    )
    p.add_argument(
        "--encoder-cache-bytes",
        type=int,
        default=WorkerConfig.encoder_cache_bytes,
        help="encode worker: bytes of embeddings kept (LRU), registered with NIXL once",
    )
    p.add_argument(
        "--embedding-buffer-bytes",
        type=int,
        default=WorkerConfig.embedding_buffer_bytes,
        help="PD/prefill worker: bytes registered with NIXL to receive embeddings into",
    )
    hand_offs = p.add_argument_group("hand-offs between workers (seconds)")
    _add_timeout_args(hand_offs, TransferTimeouts(), _TRANSFER_FLAGS)
    p.add_argument(
        "--cpu-kernels",
        action=argparse.BooleanOptionalAction,
        default=WorkerConfig.cpu_kernels,
        help="float32 decode attention on CPU, and its projections with one torch thread, through "
        "epdserve's AVX-512 kernels (built with the system C compiler on first use; torch ops "
        "where they cannot run)",
    )
    p.add_argument(
        "--kernel-cache-dir",
        default=_default_kernel_cache(env),
        help="where the built kernels are kept (default: $XDG_CACHE_HOME/epdserve/kernels)",
    )
    _add_runtime_args(p, env)
    return p


def _role(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Role:
    chosen = [role for dest, role in _ROLE_FLAGS.items() if getattr(args, dest)]
    if len(chosen) > 1:
        parser.error("choose one role flag")
    if not chosen:
        if args.is_prefill_worker:
            parser.error("--is-prefill-worker needs --multimodal-worker or --multimodal-encode-prefill-worker")
        return Role.TEXT
    if not args.enable_multimodal:
        parser.error(
            "multimodal roles require --enable-multimodal (it allows this deployment to process media from requests)"
        )
    role = chosen[0]
    if role is Role.NATIVE_ENCODER and not args.ec_storage_path:
        parser.error("--native-encoder-worker writes to the embedding cache on disk: give --ec-storage-path")
    if args.is_prefill_worker:
        if role not in (Role.PD, Role.ENCODE_PREFILL):
            parser.error("--is-prefill-worker goes with --multimodal-worker or --multimodal-encode-prefill-worker")
        return Role.PREFILL if role is Role.PD else Role.ENCODE_PREFILL
    # Alone, the encode+prefill worker serves whole requests, encoding inline (Dynamo's
    # aggregated Llama 4).
    return Role.PD if role is Role.ENCODE_PREFILL else role


def parse_worker_args(argv: Sequence[str] | None, env: Mapping[str, str]) -> WorkerConfig:
    parser = worker_parser(env)
    args = parser.parse_args(argv)
    role = _role(args, parser)
    media = MediaConfig(
        image_fetch_timeout=float(env.get("EPDSERVE_IMAGE_FETCH_TIMEOUT", MediaConfig.image_fetch_timeout)),
        video_fetch_timeout=float(env.get("EPDSERVE_VIDEO_FETCH_TIMEOUT", MediaConfig.video_fetch_timeout)),
        audio_fetch_timeout=float(env.get("EPDSERVE_AUDIO_FETCH_TIMEOUT", MediaConfig.audio_fetch_timeout)),
        allow_redirects=env.get("EPDSERVE_MEDIA_URL_ALLOW_REDIRECTS", "1") not in ("0", "false", "False"),
        allowed_domains=tuple(args.allowed_media_domains),
        allowed_local_path=args.allowed_local_media_path,
        enable_mm_embeds=args.enable_mm_embeds,
        mm_processor_kwargs=args.mm_processor_kwargs,
        **({"limit_per_prompt": args.limit_mm_per_prompt} if args.limit_mm_per_prompt is not None else {}),
    )
    return WorkerConfig(
        role=role,
        model=args.model,
        served_model_name=args.served_model_name or args.model,
        enable_multimodal=args.enable_multimodal,
        runtime=_runtime(args),
        media=media,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        ec_storage_path=args.ec_storage_path,
        encoder_cache_bytes=args.encoder_cache_bytes,
        embedding_buffer_bytes=args.embedding_buffer_bytes,
        transfer=TransferTimeouts(**_timeouts(args, _TRANSFER_FLAGS)),
        cpu_kernels=args.cpu_kernels,
        kernel_cache_dir=args.kernel_cache_dir,
    )


def parse_frontend_args(argv: Sequence[str] | None, env: Mapping[str, str]) -> FrontendConfig:
    p = argparse.ArgumentParser(prog="python -m epdserve.frontend", description="OpenAI-compatible HTTP frontend.")
    p.add_argument("--http-host", default=FrontendConfig.http_host)
    p.add_argument("--http-port", type=int, default=FrontendConfig.http_port)
    _add_runtime_args(p, env)
    args = p.parse_args(argv)
    return FrontendConfig(runtime=_runtime(args), http_host=args.http_host, http_port=args.http_port)


@dataclass(frozen=True)
class ServicesConfig:
    etcd_endpoints: str
    nats_server: str
    workdir: str | None


def parse_services_args(argv: Sequence[str] | None, env: Mapping[str, str]) -> ServicesConfig:
    p = argparse.ArgumentParser(
        prog="python -m epdserve.runtime.services",
        description="Start etcd and NATS unless something already answers there.",
    )
    p.add_argument("--etcd-endpoints", default=env.get("ETCD_ENDPOINTS", RuntimeConfig.etcd_endpoints))
    p.add_argument("--nats-server", default=env.get("NATS_SERVER", RuntimeConfig.nats_server))
    p.add_argument("--workdir", default=None, help="etcd data, NATS config, logs (default: a new directory in $TMPDIR)")
    args = p.parse_args(argv)
    return ServicesConfig(args.etcd_endpoints, args.nats_server, args.workdir)


def parse_stats_args(argv: Sequence[str] | None, env: Mapping[str, str]) -> RuntimeConfig:
    p = argparse.ArgumentParser(
        prog="python -m epdserve.tools.stats", description="Print every worker's counters (JSON) in a namespace."
    )
    _add_runtime_args(p, env)
    return _runtime(p.parse_args(argv))
