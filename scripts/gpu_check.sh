#!/usr/bin/env bash
# One-command GPU check: what only a CUDA machine can show, in one table, in under 9 minutes.
#
#   scripts/gpu_check.sh [OUT_DIR]        (PYTHON=... to use another interpreter than .venv's)
#
# 1. the CUDA-only tests (tests/unit/test_precision.py: fp16 loss scaling, bf16 on CUDA)
# 2. torchrun on the GPUs (2 processes with nccl where there are 2 GPUs; 1 process otherwise,
#    since NCCL refuses two ranks on one device): a reference run, then the same run stopped with
#    SIGTERM after its first checkpoint and resumed; the resumed losses against the reference
#    (with loss.negatives=queue: the key encoder and the queue of keys gathered over nccl)
# 3. bench/train_step.py, ViT-B-32, bf16 and fp16: step time, samples/s, peak memory
# 4. the tiled CLIP loss (D=512, float32, forward + backward) at N = 64k, 128k, ... while the
#    next size's predicted time fits the budget: the largest N measured, its time and memory
# 5. bench/small_batch.py --overhead ViT-B-32 on CUDA (bf16, batch 32): the step time of the
#    queue (key encoder) and of hard-negative captions (K = 3 and K = 1) over plain's, and of
#    plain and K = 3 with the texts padded to the context (what training ran before it cut them)
#
# Each part has its own time limit (60 + 150 + 120 + 120 + 90 s, plus ~30 s of set-up): a part
# that fails or runs out of time is a row saying so, and the others still run. Logs: OUT_DIR/*.log.
# Needs the project installed (make install) with a CUDA build of torch.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
mkdir -p "$OUT"
ROWS=()
row() { ROWS+=("| $1 | $2 | $3 |"); }
limit() { local seconds=$1; shift; timeout --kill-after=10 "$seconds" "$@"; }

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible to $PY: nothing to check" >&2
  exit 1
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
DEVICE=$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); \
print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}')")
row "device" "$GPUS GPU(s)" "$DEVICE"

# 1. CUDA-only tests
if limit 60 "$PY" -m pytest -q -rs -p no:cacheprovider tests/unit/test_precision.py \
    >"$OUT/tests.log" 2>&1; then
  row "CUDA tests" "pass" "$(tail -n 1 "$OUT/tests.log")"
else
  row "CUDA tests" "FAIL (exit $?)" "$(tail -n 1 "$OUT/tests.log") - see $OUT/tests.log"
fi

# 2. torchrun: reference, SIGTERM after the first checkpoint, resume; compare the losses
NPROC=$(( GPUS >= 2 ? 2 : 1 ))
BACKEND=$([ "$NPROC" = 2 ] && echo nccl || echo "none (1 GPU: one process)")
"$PY" -m train.synth --out "$OUT/synth" --train-shards 4 --samples-per-shard 256 --seed 0 \
  --val-samples 64 >"$OUT/synth.log" 2>&1
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m train
  --recipe smoke --set device=cuda --set steps=40 --set checkpoint.every_steps=10
  --set logging.every_steps=1 --set data.workers=2 --set data.val_shards=
  --set loss.negatives=queue --set loss.queue_size=256
  --set "data.train_shards=$OUT/synth/train/shard-{000000..000003}.tar")
check_resume() {
  limit 50 "${TORCHRUN[@]}" --overwrite --set "run_dir=$OUT/reference" >"$OUT/reference.log" 2>&1 || return 1
  timeout 50 "${TORCHRUN[@]}" --overwrite --set "run_dir=$OUT/run" >"$OUT/stopped.log" 2>&1 &
  local pid=$!  # timeout's: it passes the SIGTERM on to torchrun
  while [ ! -e "$OUT/run/checkpoints/step-00000010.pt" ] && kill -0 "$pid" 2>/dev/null; do
    sleep 0.2
  done
  kill -TERM "$pid" 2>/dev/null
  wait "$pid"
  limit 50 "${TORCHRUN[@]}" --set "run_dir=$OUT/run" --resume >"$OUT/resumed.log" 2>&1
}
if check_resume; then
  RESUME=$("$PY" - "$OUT" <<'EOF'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
def losses(run):
    rows = [json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
stop = re.search(r"stopped by SIGTERM after step (\d+)", (out / "stopped.log").read_text())
ref, run = losses("reference"), losses("run")
diff = max(abs(ref[s] - run[s]) for s in ref)
verdict = "pass" if stop and sorted(run) == sorted(ref) and diff < 1e-3 else "FAIL"
where = f"stopped at step {stop.group(1)}" if stop else "no 'stopped by SIGTERM' line"
print(f"{verdict}|{where}, resumed to {max(run)}; max abs loss difference {diff:.2e} (< 1e-3)")
EOF
)
  row "torchrun ($NPROC proc, backend $BACKEND): SIGTERM + resume" "${RESUME%%|*}" "${RESUME#*|}"
else
  row "torchrun ($NPROC proc, backend $BACKEND): SIGTERM + resume" "FAIL (exit $?)" \
    "see $OUT/reference.log, stopped.log, resumed.log"
fi

# 3. one training step of ViT-B-32 in bf16 and fp16
if limit 120 "$PY" bench/train_step.py --model ViT-B-32 --batch 256 --steps 5 \
    --precisions bf16,fp16 >"$OUT/train_step.log" 2>&1; then
  while IFS='|' read -r _ precision strategy ckpt step_ms samples peak loss _; do
    row "train step ViT-B-32 $(echo "$precision" | xargs), batch 256, $(echo "$strategy" | xargs)$( \
      [ "$(echo "$ckpt" | xargs)" = yes ] && echo ", grad ckpt")" \
      "$(echo "$samples" | xargs) samples/s" \
      "$(echo "$step_ms" | xargs) ms/step, peak $(echo "$peak" | xargs) GiB, loss $(echo "$loss" | xargs)"
  done < <(grep -E '^\| (bf16|fp16) ' "$OUT/train_step.log")
else
  row "train step ViT-B-32 bf16/fp16" "FAIL (exit $?)" "see $OUT/train_step.log"
fi

# 4. the tiled loss at the largest N the time budget allows
if LOSS=$(limit 120 "$PY" - <<'EOF' 2>"$OUT/loss.log"
import math, time
import torch
import torch.nn.functional as F
from train.config import LossConfig
from train.loss import rank_loss

budget_s, spent_s, best, dim = 100.0, 0.0, None, 512
cfg = LossConfig(kind="clip", implementation="tiled")
n = 65536
while True:
    g = torch.Generator(device="cuda").manual_seed(0)
    images = F.normalize(torch.randn(n, dim, device="cuda", generator=g), dim=-1)
    texts = F.normalize(images + math.sqrt(3) * F.normalize(
        torch.randn(n, dim, device="cuda", generator=g), dim=-1), dim=-1)
    scale = torch.tensor(math.log(1 / 0.07), device="cuda")
    inputs = [x.requires_grad_() for x in (images, texts, scale)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        loss = rank_loss(cfg, *inputs)
        loss.backward()
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        break
    seconds = time.perf_counter() - start
    spent_s += seconds
    ok = math.isfinite(loss.item()) and all(torch.isfinite(x.grad).all() for x in inputs)
    best = (n, seconds, torch.cuda.max_memory_allocated() / 2**30, loss.item(), ok)
    print(f"N={n}: {seconds:.2f} s, peak {best[2]:.1f} GiB, loss {loss.item():.4f}, finite {ok}",
          file=__import__("sys").stderr, flush=True)
    del images, texts, scale, inputs, loss
    torch.cuda.empty_cache()
    if spent_s + 4.5 * seconds > budget_s:  # the next N costs ~4x (N^2 work)
        break
    n *= 2
n, seconds, peak, loss, ok = best
tflops = 8 * n * n * dim / seconds / 1e12  # tiled runs 8*N^2*D flops (backward recomputes)
print(f"{'pass' if ok else 'FAIL: non-finite'}|N={n:,}: {seconds:.2f} s forward+backward, "
      f"peak {peak:.1f} GiB, {tflops:.0f} TFLOP/s executed, loss {loss:.4f}")
EOF
); then
  row "tiled CLIP loss, D=512 fp32, largest N in 100 s" "${LOSS%%|*}" "${LOSS#*|}"
else
  row "tiled CLIP loss, D=512 fp32" "FAIL (exit $?)" "see $OUT/loss.log"
fi

# 5. what the queue and hard-negative captions cost per step at ViT-B-32 size, batch 32, bf16
if limit 90 "$PY" bench/small_batch.py --overhead ViT-B-32 --device cuda --precision bf16 \
    --overhead-steps 10 --overhead-modes queue,hard-neg,hard-neg-k1,batch-padded,hard-neg-padded \
    >"$OUT/overhead.log" 2>&1; then
  while IFS='|' read -r _ mode seconds ratio _; do
    row "step overhead ViT-B-32 b32 bf16: $(echo "$mode" | xargs)" "$(echo "$ratio" | xargs)x batch" \
      "$(echo "$seconds" | xargs) s/step (median of 10)"
  done < <(grep -E '^\| (batch|queue|hard) ' "$OUT/overhead.log")
else
  row "step overhead ViT-B-32 b32 bf16" "FAIL (exit $?)" "see $OUT/overhead.log"
fi

echo
echo "| check | result | detail |"
echo "|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "logs: $OUT"
