#!/usr/bin/env bash
# GRPO under a compressed KV cache (RL-Sparse, gkv-method.md 5.1): G rollouts per prompt with
# POLICY at BUDGET, verifier rewards, and training forwards that replay each rollout's evictions.
#
#   MODEL=path/to/Qwen3-checkpoint scripts/rl.sh
#
# Every variable (environment), with its default:
#   MODEL           transformers checkpoint directory to start from (required)
#   TOKENIZER       tokenizer for data preparation (default: MODEL)
#   DATA            gsm8k | math500 | synthetic (default gsm8k)
#   DATA_DIR        prepared data (default data/$DATA-rl); made by prepare_data.py if missing
#   SPLITS          prepare_data.py --splits (default train=2000,test=32)
#   CHAT_TEMPLATE   1: prompts use the tokenizer's chat template (default 1)
#   OUT             checkpoints and metrics.jsonl (default out/rl-$POLICY-$BUDGET)
#   POLICY          gkv | snapkv | rkv | h2o | h2o_accumulate | tova | streamingllm | fullkv (gkv)
#   BUDGET WINDOW DIVIDE_LENGTH   cache budget, window, compression interval (512, 16, 128)
#   GROUP           samples per prompt, G (default 8)
#   MAX_NEW_TOKENS  rollout length (default 2048)
#   TEMPERATURE TOP_P   rollout sampling (0.8, 0.95, the reference's)
#   PPO_EPOCHS CLIP_EPS KL_COEF CLIP_OVERLONG   (1, 0.2, 0, true)
#   STEPS BATCH MICRO_BATCH LR WARMUP   prompts per step over all ranks etc. (400, 16, 1, 1e-6, 20)
#   EVAL_EVERY EVAL_SAMPLES SAVE_EVERY  (10, 32, 50)
#   DEVICE BF16     cuda | cpu, bf16 autocast on cuda (cuda, true)
#   NPROC           ranks on this host (default 1; data parallel over NCCL on cuda)
#   GKV_TRAIN       the binary (default build/gkv-train, built if missing)
# Extra arguments are passed to gkv-train as key=value overrides.
source "$(dirname "$0")/train_common.sh"
DATA_DIR=${DATA_DIR:-data/$DATA-rl}
SPLITS=${SPLITS:-train=2000,test=32}
OUT=${OUT:-out/rl-$POLICY-$BUDGET}
GROUP=${GROUP:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-2048}
TEMPERATURE=${TEMPERATURE:-0.8}
TOP_P=${TOP_P:-0.95}
PPO_EPOCHS=${PPO_EPOCHS:-1}
CLIP_EPS=${CLIP_EPS:-0.2}
KL_COEF=${KL_COEF:-0}
CLIP_OVERLONG=${CLIP_OVERLONG:-true}
STEPS=${STEPS:-400}
WARMUP=${WARMUP:-20}
EVAL_EVERY=${EVAL_EVERY:-10}

ensure_binary
ensure_job_data
launch_job rl group_size="$GROUP" temperature="$TEMPERATURE" top_p="$TOP_P" \
  ppo_epochs="$PPO_EPOCHS" clip_eps="$CLIP_EPS" kl_coef="$KL_COEF" clip_overlong="$CLIP_OVERLONG" \
  "$@"
