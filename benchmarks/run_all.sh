#!/usr/bin/env bash
# The runs behind docs/kernels.md. Outputs: benchmarks/results/*.txt, docs/bench_depth.png.
# Usage: bash benchmarks/run_all.sh   (from the repo root; ~12 min on a 2-core machine, 7 of them the
# GPT-2-small serving run)
set -euo pipefail
B=.venv/bin/fastff
R=benchmarks/results
mkdir -p "$R"
run() { local name=$1; shift; echo "\$ fastff bench $*" | tee "$R/$name.txt"; "$B" bench "$@" 2>"$R/$name.log" | tee -a "$R/$name.txt"; }
run nt_1x11       --layer neuron-tree --depth 11 --trees 1 --dim 768 --batch 1,64,4096,16384 --repeats 30
run fff_d8_l16    --layer fff --depth 8 --leaf 16 --dim 768 --batch 1,64,4096,16384 --repeats 30
.venv/bin/fastff train-bench --rounds 7 | tee "$R/train_bench.txt"
# the shapes the language model uses (fastff lm): dim 256 and 768, trees 1x8..1x11 and 4x8
run lm_nt_1x8_d256  --layer neuron-tree --depth 8 --trees 1 --dim 256 --batch 1,8,512,4096 --repeats 30
run lm_nt_1x11_d256 --layer neuron-tree --depth 11 --trees 1 --dim 256 --batch 1,8,512,4096 --repeats 30
run lm_nt_4x8_d256  --layer neuron-tree --depth 8 --trees 4 --dim 256 --batch 1,8,512,4096 --repeats 30
run lm_nt_1x8_d768  --layer neuron-tree --depth 8 --trees 1 --dim 768 --batch 1,8,512,4096 --repeats 30
run lm_nt_4x8_d768  --layer neuron-tree --depth 8 --trees 4 --dim 768 --batch 1,8,512,4096 --repeats 30
.venv/bin/python benchmarks/kernel_paths.py | tee "$R/kernel_paths.txt"
run nt_1x11_t1    --layer neuron-tree --depth 11 --trees 1 --dim 768 --batch 1,64,4096 --repeats 30 --threads 1
run fff_d8_l16_t1 --layer fff --depth 8 --leaf 16 --dim 768 --batch 1,64,4096 --repeats 30 --threads 1
run depth_sweep   --layer neuron-tree --depth 11 --dim 768 --batch 1 --repeats 40 --threads 1 \
                  --plot docs/bench_depth.png --plot-depths 1-15 --plot-batch 64
# cost of one small-batch call: kernel / backend / layer / nn.Linear (thread CPU time, 1 thread)
.venv/bin/python benchmarks/call_overhead.py | tee "$R/call_overhead.txt"
# end to end: a GPT-2-small-shaped model, prefill and KV-cache decoding, dense / int8 / trees
.venv/bin/fastff lm bench 2>"$R/lm_bench.log" | tee "$R/lm_bench.txt"
