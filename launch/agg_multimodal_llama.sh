#!/usr/bin/env bash
# EP+D aggregated (for models whose encoder runs inside prefill, like Llama 4): frontend,
# processor, and one encode+prefill worker that encodes the media itself, prefills and decodes.
#
#   bash launch/agg_multimodal_llama.sh [--model DIR] [--http-port 8000] [--namespace NS]
#                                       [--served-model-name NAME] [extra worker flags]
#
# Without --model it serves a tiny random-weight Llama 4 built once into ~/.cache/epdserve.
# etcd and NATS are started at ETCD_ENDPOINTS / NATS_SERVER unless something answers there.
# Ctrl-C or SIGTERM stops every process it started.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_args "$@"
ensure_model llama4
start_infra
start_frontend
worker --multimodal-processor --enable-multimodal
worker --multimodal-encode-prefill-worker --enable-multimodal
run_until_stopped
