#!/usr/bin/env bash
# E/PD with the embedding cache: frontend, processor, native encoder worker(s) that write
# embeddings to an on-disk cache, and a PD worker that reads them there (no NIXL).
#
#   bash launch/agg_multimodal_ec_connector.sh [--model DIR] [--http-port 8000] [--namespace NS]
#                                              [--served-model-name NAME] [--ec-storage-path DIR]
#                                              [--encode-workers N] [extra worker flags]
#
# Without --ec-storage-path the cache is a fresh directory, removed when the script stops.
# Without --model it serves a tiny random-weight LLaVA built once into ~/.cache/epdserve.
# etcd and NATS are started at ETCD_ENDPOINTS / NATS_SERVER unless something answers there.
# Ctrl-C or SIGTERM stops every process it started.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_args "$@"
ensure_model llava
start_infra
ensure_ec_storage
start_frontend
worker --multimodal-processor --enable-multimodal
for _ in $(seq 1 "$ENCODE_WORKERS"); do
  worker --native-encoder-worker --enable-multimodal
done
worker --multimodal-worker --enable-multimodal
run_until_stopped
