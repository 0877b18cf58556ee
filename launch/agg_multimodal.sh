#!/usr/bin/env bash
# EPD (simple aggregated): frontend, processor, and one worker that encodes, prefills and decodes.
#
#   bash launch/agg_multimodal.sh [--model DIR] [--http-port 8000] [--namespace NS]
#                                 [--served-model-name NAME] [extra worker flags]
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
worker --multimodal-worker --enable-multimodal
run_until_stopped
