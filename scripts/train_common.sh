# Shared by scripts/distill.sh and scripts/rl.sh (sourced, not run): builds gkv-train when it is
# missing, prepares the data when it is missing, and launches one process per GPU (torchrun
# --no-python sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${GKV_TRAIN:=$ROOT/build/gkv-train}"

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

# launch RECIPE key=value ...: one rank, or NPROC ranks on this host.
launch() {
  if [ "${NPROC:-1}" -gt 1 ]; then
    torchrun --no-python --standalone --nproc-per-node "$NPROC" "$GKV_TRAIN" "$@"
  else
    "$GKV_TRAIN" "$@"
  fi
}
