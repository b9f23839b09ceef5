#!/usr/bin/env bash
# The CPU's heavy jobs for the students (#18) and the table (#16), one at a time, in the issues' order: the grown
# teacher run, then the 0.5B student on its data (the main student), its CoT twin and their validation, then the
# teacher on validation, the table rows that need no distilled student, then the FTP data and student, then the 135M.
#
#   setsid runs/cpu/queue.sh &   # run every unfinished step in order (nice 19), committing outputs every 20 min
#                                # (its own process group: --pause/--resume/--stop-and-save signal that group)
#   runs/cpu/queue.sh --list     # what each step is and whether it is finished
#   runs/cpu/queue.sh --pause / --resume   # SIGSTOP / SIGCONT the running step (the test suite wants both cores)
#   runs/cpu/queue.sh --stop-and-save      # ~15 min before the session ends: stop after the next checkpoint, commit it
#   runs/cpu/queue.sh --save-checkpoint    # commit the running training's newest complete checkpoint
#
# Every step resumes where it stopped (teacher JSONL and evaluate records skip answered questions; training restarts
# from its latest checkpoint, every 5 optimizer steps), and a step counts as finished by what its committed output says,
# so a fresh checkout continues where the last session stopped. Needs `make models-big llama-server` first.
set -uo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export AGENT_DISTILLATION_DATA=${AGENT_DISTILLATION_DATA:-$(realpath ../shared/data)}
export LLAMA_SERVER=${LLAMA_SERVER:-$PWD/.venv/bin/llama-server}
PY=.venv/bin/python; AD=.venv/bin/agent-distill
LOG=${QUEUE_LOG:-.cache/queue}; mkdir -p "$LOG"
S=runs/cpu/students; V=runs/cpu/validation; T=runs/cpu/table2_records  # T: the table's rows (#16), 400 questions each
# glibc keeps freed blocks in the heap (training spent 46 % of its time in page faults otherwise; Makefile).
TRAIN="env MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 $PY -m agent_distillation.distill"
# The 0.5B on the grown data (754 trajectories, 676,967 tokens an epoch): no gradient checkpointing and glibc's default
# malloc, 3.5 instead of 5.4 min per step on the 8 longest trajectories at the same peak memory (13.4 GB; Makefile).
# Measured 2026-12-06 with the machine left to it: ~100 tokens/s (the first run logged 30.8 with checkpointing, sharing
# the CPU with helpers), so two epochs take ~3.8 h: more than a session, hence --save-checkpoint.
TRAIN_FAST="$PY -m agent_distillation.distill"
AGENT=runs/cpu/teacher/agent.jsonl,runs/cpu/teacher-rest/agent.jsonl
COT=runs/cpu/teacher/cot.jsonl,runs/cpu/teacher-rest/cot.jsonl
AGENT_FTP=runs/cpu/teacher/agent_ftp.jsonl,runs/cpu/teacher-rest/agent_ftp.jsonl  # first-thought-prefix trajectories
EV="$AD evaluate --benchmarks world_validation,math_validation --n 1000"

# name | finished when | command | folders to commit
# A name ending in @long must run start to finish within one session: the 135M agent student is fully fine-tuned (float32
# weights + AdamW state: a 1.6 GB checkpoint, too big to commit, so nothing carries over to the next session). Measured
# 2026-12-06: 173 tokens/s, so two epochs of the grown agent data take ~2.2 h. The queue stops before such a step unless
# QUEUE_LONG=1 (set it when the session has the time ahead of it), or run it on a lent GPU (runs/gpu/lease.sh).
# LoRA r64 for the 0.5B is @long too: its checkpoint is 423 MB (optimizer.pt alone 282 MB, over what a git host takes
# in one file), so the r16-vs-r64 check runs on the first teacher run's 196 trajectories (~367 k tokens, about 1 h),
# against the committed r16 student trained on the same data; the 0.5B model (469 MB) is too big to carry to a lent GPU.
# Weights that are not committed (the r64 adapter) live only as long as the checkout: a step that uses them must
# finish in the session that trained them. A full fine-tuning run's final weights are committed (bf16, 90 MB shards:
# distill.FULL_SHARD_SIZE), so its validation and table rows can run in later sessions; its training cannot resume
# across sessions (the float32 checkpoint is 1.6 GB), hence @long.
STEPS=(
"teacher-rest|teacher_done runs/cpu/teacher-rest 950|$AD teacher --out_dir runs/cpu/teacher-rest --world_split rest --n_world 750 --math_benchmark math_medium --n_math 200 --n_world_test 0 --modes cot,agent|runs/cpu/teacher-rest"
"0.5b-agent-grown|trained $S/qwen2.5-coder-0.5b-agent-grown-r16|$TRAIN_FAST $AGENT --base qwen2.5-coder-0.5b-instruct --lora_r 16 --lora_alpha 32 --epochs 2 --save_steps 5 --out_dir $S/qwen2.5-coder-0.5b-agent-grown-r16|$S/qwen2.5-coder-0.5b-agent-grown-r16"
"0.5b-agent-grown-val|records $V/0.5b-agent-grown-r16.llama-cpp.jsonl 210|$EV --engine llama.cpp --base qwen2.5-coder-0.5b-instruct --methods agent_distill --adapter $S/qwen2.5-coder-0.5b-agent-grown-r16 --cot_adapter none --out $V/0.5b-agent-grown-r16.llama-cpp.jsonl|$V"
"0.5b-cot-grown|trained $S/qwen2.5-coder-0.5b-cot-grown-r16|$TRAIN $COT --kind cot --base qwen2.5-coder-0.5b-instruct --lora_r 16 --lora_alpha 32 --epochs 2 --save_steps 5 --gradient_checkpointing --out_dir $S/qwen2.5-coder-0.5b-cot-grown-r16|$S/qwen2.5-coder-0.5b-cot-grown-r16"
"0.5b-cot-grown-val|records $V/0.5b-cot-grown-r16.llama-cpp.jsonl 210|$EV --engine llama.cpp --base qwen2.5-coder-0.5b-instruct --methods cot_distill --adapter none --cot_adapter $S/qwen2.5-coder-0.5b-cot-grown-r16 --out $V/0.5b-cot-grown-r16.llama-cpp.jsonl|$V"
"teacher-validation|records $V/teacher.llama-cpp.jsonl 420|$EV --methods teacher_agent,teacher_cot --out $V/teacher.llama-cpp.jsonl|$V"
"table-teacher|rows_done teacher__cot teacher__agent|$AD reproduce --profile cpu --rows teacher/cot,teacher/agent|$T runs/cpu/table2.json"
"table-prompting|rows_done 0.5b__cot_prompting 0.5b__agent_prompting 135m__cot_prompting 135m__agent_prompting|$AD reproduce --profile cpu --rows 0.5b/cot_prompting,0.5b/agent_prompting,135m/cot_prompting,135m/agent_prompting|$T runs/cpu/table2.json"
"teacher-rest-ftp|teacher_done runs/cpu/teacher-rest 950 agent_ftp|$AD teacher --out_dir runs/cpu/teacher-rest --world_split rest --n_world 750 --math_benchmark math_medium --n_math 200 --n_world_test 0 --modes cot,agent,agent_ftp|runs/cpu/teacher-rest"
"0.5b-agent-ftp-grown|trained $S/qwen2.5-coder-0.5b-agent-ftp-grown-r16|$TRAIN_FAST $AGENT_FTP --base qwen2.5-coder-0.5b-instruct --lora_r 16 --lora_alpha 32 --epochs 2 --save_steps 5 --out_dir $S/qwen2.5-coder-0.5b-agent-ftp-grown-r16|$S/qwen2.5-coder-0.5b-agent-ftp-grown-r16"
"0.5b-agent-ftp-grown-val|records $V/0.5b-agent-ftp-grown-r16.llama-cpp.jsonl 210|$EV --engine llama.cpp --base qwen2.5-coder-0.5b-instruct --methods agent_distill_ftp --adapter none --cot_adapter none --ftp_adapter $S/qwen2.5-coder-0.5b-agent-ftp-grown-r16 --out $V/0.5b-agent-ftp-grown-r16.llama-cpp.jsonl|$V"
# (the 135M CoT twin's weights are gitignored: its validation, and its table rows once added, must follow in the same session)
"135m-cot-grown|trained $S/smollm2-135m-cot-grown-full|$TRAIN $COT --kind cot --full_finetune --lr 5e-5 --epochs 2 --save_steps 10 --out_dir $S/smollm2-135m-cot-grown-full|$S/smollm2-135m-cot-grown-full"
"135m-cot-grown-val|records $V/135m-cot-grown-full.transformers.jsonl 210|$EV --engine transformers --base smollm2-135m-instruct --methods cot_distill --adapter none --cot_adapter $S/smollm2-135m-cot-grown-full --out $V/135m-cot-grown-full.transformers.jsonl|$V"
"0.5b-agent-r64@long|trained $S/qwen2.5-coder-0.5b-agent-r64|$TRAIN_FAST runs/cpu/teacher/agent.jsonl --base qwen2.5-coder-0.5b-instruct --lora_r 64 --lora_alpha 128 --epochs 2 --save_steps 5 --out_dir $S/qwen2.5-coder-0.5b-agent-r64|$S/qwen2.5-coder-0.5b-agent-r64"
"0.5b-agent-r64-val|records $V/0.5b-agent-r64.llama-cpp.jsonl 210|$EV --engine llama.cpp --base qwen2.5-coder-0.5b-instruct --methods agent_distill --adapter $S/qwen2.5-coder-0.5b-agent-r64 --cot_adapter none --out $V/0.5b-agent-r64.llama-cpp.jsonl|$V"
"135m-agent-grown@long|trained $S/smollm2-135m-agent-grown-full|$TRAIN $AGENT --full_finetune --lr 5e-5 --epochs 2 --save_steps 10 --out_dir $S/smollm2-135m-agent-grown-full|$S/smollm2-135m-agent-grown-full"
"135m-agent-grown-val|records $V/135m-agent-grown-full.transformers.jsonl 210|$EV --engine transformers --base smollm2-135m-instruct --methods agent_distill --adapter $S/smollm2-135m-agent-grown-full --cot_adapter none --out $V/135m-agent-grown-full.transformers.jsonl|$V"
)

teacher_done() {  # folder, units per mode[, modes]: each mode (default cot,agent) has answered that many questions
  $PY -c "import json, sys; r = json.load(open('$1/provenance.json'))['results']; \
sys.exit(0 if all(r[k]['done'] >= $2 for k in '${3:-cot,agent}'.split(',')) else 1)" 2>/dev/null
}
records() { [ -f "$1" ] && [ "$(wc -l < "$1")" -ge "$2" ]; }  # an evaluate file with at least N records
rows_done() { local r; for r in "$@"; do records "$T/$r.jsonl" 400 || return 1; done; }  # table rows with every question
trained() { $PY -c "import json, sys; sys.exit(0 if json.load(open('$1/settings.json')).get('finished') else 1)" 2>/dev/null; }

field() { cut -d'|' -f"$2" <<< "$1"; }
commit_outputs() {  # paths, message[, checkpoint to keep | "drop"]: commit the step's own folders through a private
  # index (never whatever else is staged in the checkout); a committed training checkpoint is replaced by the one named,
  # leaves the tree with "drop" (the run finished), or else stays, even once the trainer has rotated it off the disk.
  # Serialised (the 20-min committer, a step's last commit and --save-checkpoint never interleave); HEAD is
  # compare-and-swapped, so a commit made meanwhile is never reverted or dropped. rc 0 committed, 1 nothing new, 2 failed.
  ( flock 9; _commit_outputs "$@" ) 9>"$(git rev-parse --git-path queue-commit.lock)"
}
_commit_outputs() {
  local paths=$1 msg=$2 ckpt=${3:-} head new p ok=1 rc
  head=$(git rev-parse --verify HEAD) || return 2
  export GIT_INDEX_FILE=$(mktemp -u); git read-tree "$head"
  for p in $paths; do
    [ -n "$ckpt" ] && git rm -r -q --cached --ignore-unmatch -- "$p/checkpoint-*" >/dev/null
    [ -e "$p" ] || continue
    if [ -n "$ckpt" ]; then git add -A -- "$p" || ok=
    else git add -A -- "$p" ":(exclude)$p/checkpoint-*" || ok=; fi
  done
  [ -n "$ckpt" ] && [ "$ckpt" != drop ] && { git add -f -- "$ckpt" || ok=; }
  if [ -z "$ok" ]; then rc=2
  elif git diff --cached --quiet "$head"; then rc=1
  else new=$(git commit-tree "$(git write-tree)" -p "$head" -m "$msg") && git update-ref HEAD "$new" "$head" && rc=0 || rc=2; fi
  rm -f "$GIT_INDEX_FILE"; unset GIT_INDEX_FILE; [ $rc = 0 ] && git reset -q -- $paths
  [ $rc = 0 ] && echo "$(date +%T) committed $paths${ckpt:+ ($ckpt)}"
  return $rc
}

case "${1:-}" in
  --list)
    for s in "${STEPS[@]}"; do eval "$(field "$s" 2)" && st=finished || st=open; printf '%-22s %-9s %s\n' "$(field "$s" 1)" "$st" "$(field "$s" 3)"; done
    exit 0;;
  --save-checkpoint)  # before a session ends: commit the running training step's latest checkpoint (checkpoints are
    # gitignored and a checkout does not outlive its session); the older committed one leaves the tree
    for s in "${STEPS[@]}"; do
      check=$(field "$s" 2); [[ $check == trained* ]] || continue; eval "$check" && continue
      [[ $(field "$s" 1) == *@long ]] && { echo "$(field "$s" 1): @long, its checkpoints are never committed"; exit 0; }
      out=${check#trained }  # the newest complete checkpoint: the trainer writes trainer_state.json last
      last=$(ls -d "$out"/checkpoint-*/trainer_state.json 2>/dev/null | sort -V | tail -1); last=${last%/trainer_state.json}
      [ -n "$last" ] || { echo "no complete checkpoint in $out yet"; exit 0; }
      big=$(find "$last" -type f -size +95M | head -1)  # a git host refuses files over 100 MB (full fine-tuning, LoRA r64)
      [ -z "$big" ] || { echo "$last holds $big ($(du -h "$big" | cut -f1)): too big to commit; this run cannot carry over"; exit 2; }
      commit_outputs "$out" "Queue ($(field "$s" 1)): $last, to resume next session" "$last"; rc=$?
      [ $rc = 1 ] && { echo "$last is already committed"; rc=0; }; exit $rc
    done; echo 'no training step running'; exit 0;;
  --stop-and-save)  # before a session ends: a training step waits (at most ${2:-900} s) for its next complete checkpoint,
    # then the queue stops and the checkpoint is committed (what it trained after that is lost either way); any other
    # step stops at once and its outputs so far are committed
    for s in "${STEPS[@]}"; do
      check=$(field "$s" 2); eval "$check" && continue
      newest() { ls -d "${check#trained }"/checkpoint-*/trainer_state.json 2>/dev/null | sort -V | tail -1; }
      if [[ $check == trained* ]] && [[ $(field "$s" 1) != *@long ]]; then
        before=$(newest); end=$((SECONDS + ${2:-900}))
        while [ "$(newest)" = "$before" ] && [ $SECONDS -lt $end ]; do sleep 5; done
      fi
      [ -f "$LOG/pid" ] && pkill -TERM -g "$(cat "$LOG/pid")" && echo "stopped the queue ($(field "$s" 1))"; sleep 3
      [[ $check == trained* ]] && exec "$0" --save-checkpoint
      commit_outputs "$(field "$s" 4)" "Queue ($(field "$s" 1)): stopped at the session's end"; exit 0
    done; echo 'every step is finished'; exit 0;;
  --pause|--resume)
    sig=$([ "$1" = --pause ] && echo STOP || echo CONT)
    [ -f "$LOG/pid" ] && pkill -$sig -g "$(cat "$LOG/pid")" && echo "sent SIG$sig to the queue's process group" || echo 'no queue running'
    exit 0;;
esac

echo $$ > "$LOG/pid"
for s in "${STEPS[@]}"; do
  name=$(field "$s" 1); check=$(field "$s" 2); cmd=$(field "$s" 3); paths=$(field "$s" 4)
  if eval "$check"; then echo "$(date +%T) $name: finished"; continue; fi
  if [[ $name == *@long ]] && [ "${QUEUE_LONG:-0}" != 1 ]; then
    echo "$(date +%T) $name: must finish within one session (no checkpoint carries over); QUEUE_LONG=1 starts it. The queue stops here"
    exit 1
  fi
  echo "$(date +%T) $name: $cmd"
  ( while sleep 1200; do commit_outputs "$paths" "Queue ($name): progress"; done ) & committer=$!
  nice -n 19 $cmd > "$LOG/$name.log" 2>&1; rc=$?
  kill $committer 2>/dev/null
  commit_outputs "$paths" "Queue ($name): $( [ $rc = 0 ] && echo finished || echo "stopped, exit $rc")" $(eval "$check" && echo drop)
  if [ $rc != 0 ] || ! eval "$check"; then echo "$(date +%T) $name: exit $rc, not finished (log: $LOG/$name.log); the queue stops here"; exit 1; fi
done
echo "$(date +%T) every step finished"
