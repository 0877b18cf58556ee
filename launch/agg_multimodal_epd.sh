#!/usr/bin/env bash
# E/PD (encode separate): frontend, processor, encode worker(s), and a worker that prefills and
# decodes. Embeddings go from the encode worker to the PD worker over NIXL.
#
#   bash launch/agg_multimodal_epd.sh [--model DIR] [--http-port 8000] [--namespace NS]
#                                     [--served-model-name NAME] [--encode-workers N]
#                                     [extra worker flags]
#
# Without --model it serves a tiny random-weight LLaVA built once into ~/.cache/epdserve.
# etcd and NATS are started at ETCD_ENDPOINTS / NATS_SERVER unless something answers there.
# Ctrl-C or SIGTERM stops every process it started.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_args "$@"
ensure_model llava
start_infra
start_frontend
worker --multimodal-processor --enable-multimodal
workers "$ENCODE_WORKERS" --multimodal-encode-worker --enable-multimodal
worker --multimodal-worker --enable-multimodal
run_until_stopped
