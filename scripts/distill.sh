#!/usr/bin/env bash
# Self-distillation from the full KV cache to a compressed one (gkv-method.md 5.2): the student
# (MODEL) trains under POLICY's teacher-forced compression to match a frozen FullKV teacher.
#
#   MODEL=path/to/Qwen3-checkpoint scripts/distill.sh
#
# Every variable (environment), with its default:
#   MODEL           transformers checkpoint directory to start from (required)
#   TEACHER         teacher checkpoint; empty: MODEL's initial weights (self-distillation)
#   TOKENIZER       tokenizer for data preparation (default: MODEL)
#   DATA            gsm8k | math500 | synthetic (default gsm8k)
#   DATA_DIR        prepared data (default data/$DATA-distill); made by prepare_data.py if missing
#   SPLITS          prepare_data.py --splits (default train=2000,test=64)
#   CHAT_TEMPLATE   1: prompts use the tokenizer's chat template (default 1)
#   OUT             checkpoints and metrics.jsonl (default out/distill-$POLICY-$BUDGET)
#   POLICY          gkv | snapkv | rkv | h2o | h2o_accumulate | tova | streamingllm (default gkv)
#   BUDGET WINDOW DIVIDE_LENGTH   cache budget, window, compression interval (512, 16, 128)
#   TEMPERATURE     KL temperature (default 0.6, the reference's)
#   GENERATE        1: the teacher writes the responses instead of the dataset (default 0)
#   MAX_NEW_TOKENS  teacher response length with GENERATE=1, and eval length (default 1024)
#   STEPS BATCH MICRO_BATCH LR WARMUP   optimisation (250, 16, 1, 1e-6, 12)
#   MAX_SEQ_LEN     prompt + response tokens kept (default 4096)
#   EVAL_EVERY EVAL_SAMPLES SAVE_EVERY  (20, 32, 50)
#   DEVICE BF16     cuda | cpu, bf16 autocast on cuda (cuda, true)
#   NPROC           ranks on this host (default 1; data parallel over NCCL on cuda)
#   GKV_TRAIN       the binary (default build/gkv-train, built if missing)
# Extra arguments are passed to gkv-train as key=value overrides.
source "$(dirname "$0")/train_common.sh"
TEACHER=${TEACHER:-}
DATA_DIR=${DATA_DIR:-data/$DATA-distill}
SPLITS=${SPLITS:-train=2000,test=64}
OUT=${OUT:-out/distill-$POLICY-$BUDGET}
TEMPERATURE=${TEMPERATURE:-0.6}
GENERATE=${GENERATE:-0}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-1024}
STEPS=${STEPS:-250}
WARMUP=${WARMUP:-12}
MAX_SEQ_LEN=${MAX_SEQ_LEN:-4096}
EVAL_EVERY=${EVAL_EVERY:-20}

ensure_binary
ensure_job_data
launch_job distill teacher="$TEACHER" distill_temperature="$TEMPERATURE" \
  distill_generate="$([ "$GENERATE" = 1 ] && echo true || echo false)" \
  max_seq_len="$MAX_SEQ_LEN" "$@"
