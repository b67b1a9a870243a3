#!/usr/bin/env bash
# The whole pipeline on the built-in synthetic dataset:
#   synthetic shards -> torchrun training (2 CPU processes, gloo) -> model artifact
#   -> held-out evaluation -> FAISS index -> the HTTP service on 127.0.0.1:$PORT.
# Re-running it reuses what is there (the dataset; training resumes from its last checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=.venv/bin
DATA=${DATA:-data/synth}
RUN=${RUN:-runs/demo}
PORT=${PORT:-8000}
VAL="$DATA/val/shard-{000000..000001}.tar"

step() { printf '\n== %s\n' "$*"; }

if [ ! -f "$DATA/dataset.json" ]; then
  step "1/5 synthetic dataset -> $DATA"
  $BIN/python -m train.synth --out "$DATA" --train-shards 16 --samples-per-shard 500 \
    --val-samples 1000 --seed 0
else
  step "1/5 synthetic dataset: reusing $DATA"
fi

step "2/5 training duet-tiny with torchrun --nproc_per_node=2 (CPU, gloo) -> $RUN"
start=$(date +%s)
$BIN/torchrun --standalone --nproc_per_node=2 -m train --recipe demo --resume \
  --set run_dir="$RUN" \
  --set data.train_shards="$DATA/train/shard-{000000..000015}.tar" \
  --set data.val_shards="$VAL" --set data.zeroshot_file="$DATA/zeroshot.json"
echo "training took $(( $(date +%s) - start )) s"

step "3/5 the run: figures, held-out evaluation ($RUN/eval.json) and curves ($RUN/report.png)"
$BIN/python -m train.report "$RUN"

step "4/5 FAISS index of the held-out images -> $RUN/index"
$BIN/python -m serve.build_index --model "$RUN/artifact" --data "$VAL" --out "$RUN/index"
$BIN/python scripts/example_image.py "$DATA/val/shard-000000.tar" "$RUN/example.jpg"

step "5/5 serving on http://127.0.0.1:$PORT (Ctrl-C to stop). Try, from another terminal:"
cat <<CURL
  curl -s -X POST http://127.0.0.1:$PORT/search -H 'content-type: application/json' \\
       -d '{"text": "a red circle", "k": 5}'
  curl -s -X POST http://127.0.0.1:$PORT/classify -F image=@$RUN/example.jpg \\
       -F labels="red circle" -F labels="blue square" -F labels="green star" -F labels="yellow triangle"
  Web page (search box, image drop zone, zero-shot panel): http://127.0.0.1:$PORT/
  API docs: http://127.0.0.1:$PORT/docs
CURL
export DUET_ARTIFACT_DIR="$RUN/artifact" DUET_INDEX_DIR="$RUN/index" DUET_PORT="$PORT"
exec $BIN/python -m serve
