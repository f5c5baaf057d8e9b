#!/usr/bin/env bash
# The GPU paths, once: run on a machine with one CUDA device, from the repository root, with .venv built
# (make .venv/.installed). At most about 8 minutes on one H100. Writes benchmarks/results/gpu_check/
# (or $OUT/gpu_check when $OUT is set): one log per check, summary.md with every run's memory and
# step figures, and the exit status of each check. Nothing here runs on CPU-only machines.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DEST="${OUT:-benchmarks/results}/gpu_check"
RUNS=$(mktemp -d)
mkdir -p "$DEST"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
status=0
check() {  # check NAME COMMAND...: run it, log it, record its exit status
  local name=$1; shift
  local t0=$SECONDS
  "$@" >"$DEST/$name.log" 2>&1
  local rc=$?
  echo "| $name | $rc | $((SECONDS - t0)) s |" >>"$DEST/status.md"
  [ $rc -eq 0 ] || status=1
}
printf '| check | exit | time |\n|---|---:|---:|\n' >"$DEST/status.md"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$DEST/device.txt" 2>&1

# 1. the tests that skip without CUDA: offload's round trip, the CUDA peak reader
check cuda-tests $PY -m pytest -q -rs tests/test_state_policy.py tests/test_memory.py

# 2. mixed precision, 40 steps of MiniLM-L6: bf16 under both optimizers, fp16 (the loss scaler) under the
# global one; fp16 with the local optimizers (which the scaler cannot step) must be refused in one line, exit 2
train() { $PY -m dynalora train --device cuda --max-train-samples 1280 --max-steps 40 --quiet --overwrite "$@"; }
for opt in local global; do
  check "bf16-$opt" train --bf16 --optimizer "$opt" --output-dir "$RUNS/bf16-$opt"
done
check fp16-global train --fp16 --optimizer global --output-dir "$RUNS/fp16-global"
refused() { train "$@"; [ $? -eq 2 ]; }
check fp16-local-refused refused --fp16 --optimizer local --output-dir "$RUNS/fp16-local"
check offload-reset train --state-policy offload --output-dir "$RUNS/offload"
check base-bf16 train --base-dtype bf16 --output-dir "$RUNS/base-bf16"
check full-ft train --method full --no-dynamic --output-dir "$RUNS/full"
check dynamic-full-bf16 train --method full --dynamic --inactive-dtype bf16 --state-policy reset \
  --output-dir "$RUNS/dynamic-full-bf16"

# 3. FSDP2 on one CUDA device (nccl), DynaLoRA through the library
cat >"$RUNS/fsdp2.py" <<'EOF'
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification
from dynalora import DynamicAllocator, DynamicConfig
dist.init_process_group("nccl"); torch.cuda.set_device(0); torch.manual_seed(0)
model = get_peft_model(BertForSequenceClassification(BertConfig(num_hidden_layers=4, hidden_size=128,
    num_attention_heads=4, intermediate_size=256)), LoraConfig(task_type="SEQ_CLS", r=4)).cuda()
for layer in model.base_model.model.bert.encoder.layer:
    fully_shard(layer)
fully_shard(model)
alloc = DynamicAllocator(model, DynamicConfig())
opt = alloc.create_optimizer(torch.optim.AdamW, lr=1e-3)
for step in range(20):
    batch = {"input_ids": torch.randint(0, 1000, (8, 32), device="cuda"), "labels": torch.randint(0, 2, (8,), device="cuda")}
    model(**batch).loss.backward(); opt.step(); opt.zero_grad(); alloc.step()
print("fsdp2 ok:", alloc.step_count, "steps,", len(alloc.history), "allocations, active now", len(alloc.active))
dist.destroy_process_group()
EOF
check fsdp2-one-device $PY -m torch.distributed.run --nproc_per_node 1 "$RUNS/fsdp2.py"
# and from the command line (nccl, one process): the default and dynamic full fine-tuning under --fsdp
fsdp_train() { $PY -m torch.distributed.run --nproc_per_node 1 -m dynalora train --device cuda --fsdp \
  --max-train-samples 640 --max-steps 20 --quiet --overwrite "$@"; }
check fsdp2-cli-default fsdp_train --output-dir "$RUNS/fsdp2-cli-default"
check fsdp2-cli-dynamic-full fsdp_train --method full --dynamic --output-dir "$RUNS/fsdp2-cli-dynamic-full"

# 4. the default against LoRA on SmolLM2-135M, whole runs side by side (step ratio, total memory)
check smollm2-compare $PY -m dynalora compare --model embedded:smollm2-135m --device cuda --max-steps 60 \
  --output-dir "$RUNS/smollm2"

# 5. total memory beside counted bytes and torch.cuda.max_memory_allocated, for every run above
$PY - "$RUNS" >"$DEST/summary.md" <<'EOF'
import json, sys
from pathlib import Path
mib = 2**20
print("| run | median step ms | weights MiB | training bytes MiB (peak) | total MiB (peak step) | max_memory_allocated MiB |")
print("|---|---:|---:|---:|---:|---:|")
for metrics in sorted(Path(sys.argv[1]).rglob("metrics.json")):
    m = json.loads(metrics.read_text()); mem = m.get("memory", {})
    cuda = m["peak_memory_bytes"] / mib if m.get("peak_memory_kind") == "cuda_max_allocated" else float("nan")
    print(f"| {metrics.parent.relative_to(sys.argv[1])} | {m['median_step_ms']:.1f} | {mem.get('peak_weights', 0) / mib:.1f}"
          f" | {mem.get('peak_total', 0) / mib:.1f} | {mem.get('peak_total_with_weights', 0) / mib:.1f} | {cuda:.1f} |")
EOF
cat "$DEST/status.md" "$DEST/summary.md"
exit $status
