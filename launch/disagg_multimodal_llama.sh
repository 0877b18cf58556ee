#!/usr/bin/env bash
# EP/D (for models whose encoder runs inside prefill, like Llama 4), over two nodes:
#   head node (--head-node): etcd/NATS (unless ETCD_ENDPOINTS / NATS_SERVER answer), frontend,
#     processor and encode+prefill worker(s), which encode the media themselves;
#   worker node (no --head-node): decode worker(s), joining the head node's etcd and NATS at
#     ETCD_ENDPOINTS / NATS_SERVER. The prompt's KV goes from prefill to decode over NIXL.
# The model is served once both nodes are up.
#
#   bash launch/disagg_multimodal_llama.sh --head-node [--model DIR] [--http-port 8000]
#        [--namespace NS] [--served-model-name NAME] [--prefill-workers N] [extra worker flags]
#   ETCD_ENDPOINTS=http://HEAD:2379 NATS_SERVER=nats://HEAD:4222 \
#     bash launch/disagg_multimodal_llama.sh [--model DIR] [--namespace NS]
#        [--served-model-name NAME] [--decode-workers N] [extra worker flags]
#
# Without --model it serves a tiny random-weight Llama 4 built once into ~/.cache/epdserve.
# Ctrl-C or SIGTERM stops every process it started.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_args "$@"
ensure_model llama4
if [ "$HEAD_NODE" = 1 ]; then
  start_infra
  start_frontend
  worker --multimodal-processor --enable-multimodal
  workers "$PREFILL_WORKERS" --multimodal-encode-prefill-worker --is-prefill-worker --enable-multimodal
  run_until_stopped
else
  join_infra
  workers "$DECODE_WORKERS" --multimodal-decode-worker --enable-multimodal
  run_workers_until_stopped
fi
