# Shared by scripts/distill.sh and scripts/rl.sh (sourced, not run): the variables both jobs
# read, with their defaults; builds gkv-train when it is missing, prepares the data when it is
# missing, and launches one process per GPU (torchrun --no-python sets RANK / WORLD_SIZE /
# LOCAL_RANK / MASTER_ADDR / MASTER_PORT).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${GKV_TRAIN:=$ROOT/build/gkv-train}"
: "${MODEL:?set MODEL to a transformers checkpoint directory}"
TOKENIZER=${TOKENIZER:-$MODEL}
DATA=${DATA:-gsm8k}
CHAT_TEMPLATE=${CHAT_TEMPLATE:-1}
POLICY=${POLICY:-gkv}
BUDGET=${BUDGET:-512}
WINDOW=${WINDOW:-16}
DIVIDE_LENGTH=${DIVIDE_LENGTH:-128}
BATCH=${BATCH:-16}
MICRO_BATCH=${MICRO_BATCH:-1}
LR=${LR:-1e-6}
EVAL_SAMPLES=${EVAL_SAMPLES:-32}
SAVE_EVERY=${SAVE_EVERY:-50}
DEVICE=${DEVICE:-cuda}
BF16=${BF16:-true}

ensure_binary() {
  if [ ! -x "$GKV_TRAIN" ]; then
    echo "building gkv-train into $ROOT/build" >&2
    cmake -S "$ROOT" -B "$ROOT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build "$ROOT/build" --target gkv-train
  fi
}

# ensure_data DIR DATA TOKENIZER SPLITS [extra prepare_data.py args...]
ensure_data() {
  local dir=$1 data=$2 tokenizer=$3 splits=$4
  shift 4
  if [ ! -f "$dir/train.jsonl" ] || [ ! -f "$dir/vocab.json" ]; then
    python "$ROOT/scripts/prepare_data.py" --data "$data" --tokenizer "$tokenizer" \
      --splits "$splits" --out "$dir" "$@"
  fi
}

# ensure_job_data: ensure_data with the job's DATA_DIR, DATA, TOKENIZER, SPLITS and CHAT_TEMPLATE.
ensure_job_data() {
  local template=()
  [ "$CHAT_TEMPLATE" = 1 ] && template=(--chat-template)
  ensure_data "$DATA_DIR" "$DATA" "$TOKENIZER" "$SPLITS" "${template[@]}"
}

# launch_job RECIPE key=value ...: launch with the keys both jobs take from the variables above
# (and from the job's DATA_DIR, OUT, MAX_NEW_TOKENS, STEPS, WARMUP, EVAL_EVERY) first, so that
# the job's own keys and the user's overrides come after them.
launch_job() {
  local recipe=$1
  shift
  launch "$recipe" model="$MODEL" data="$DATA_DIR/train.jsonl" eval_data="$DATA_DIR/test.jsonl" \
    out_dir="$OUT" policy="$POLICY" budget="$BUDGET" window="$WINDOW" \
    divide_length="$DIVIDE_LENGTH" max_new_tokens="$MAX_NEW_TOKENS" \
    eval_max_new_tokens="$MAX_NEW_TOKENS" steps="$STEPS" batch_size="$BATCH" \
    micro_batch_size="$MICRO_BATCH" lr="$LR" warmup_steps="$WARMUP" eval_every="$EVAL_EVERY" \
    eval_samples="$EVAL_SAMPLES" save_every="$SAVE_EVERY" device="$DEVICE" bf16="$BF16" "$@"
}

# launch RECIPE key=value ...: one rank, or NPROC ranks on this host.
launch() {
  if [ "${NPROC:-1}" -gt 1 ]; then
    torchrun --no-python --standalone --nproc-per-node "$NPROC" "$GKV_TRAIN" "$@"
  else
    "$GKV_TRAIN" "$@"
  fi
}
