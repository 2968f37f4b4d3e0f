#!/usr/bin/env bash
# Download, on a machine with pip and a network, the wheels that `make gpu-check` needs and the GPU machine's
# image lacks, into benchmarks/gpu-wheels/ (git-ignored through .git/info/exclude; carry it to the GPU
# machine). benchmarks/gpu_check.py unpacks them there and puts them on sys.path after the installed
# packages; nothing is installed. See docs/gpu-check.md.
#
# The set: cachefeat's dependencies (pyproject.toml) absent from the GPU image's package list
# (/work/.library/device/KINDS.md: it has torch, torchvision, timm, numpy, h5py, click, tqdm, pyyaml,
# psutil, pillow, matplotlib, regex, safetensors, huggingface-hub, packaging, typing-extensions) and,
# through each wheel's Requires-Dist, theirs. Left out: Ray (hundreds of MiB; its steps are skipped) and
# decord (optional; PyAV decodes). The versions are the ones the project's tests run with.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
dest="${GPU_WHEELS:-$here/gpu-wheels}"
python="${PYTHON:-python3}"
# the GPU image's python (KINDS.md: Python 3.12, x86-64)
py_version="${GPU_PYTHON_VERSION:-3.12}"
wheels=(
  zarr==3.1.6 numcodecs==0.16.6 crc32c==2.9.post0 google-crc32c==1.9.0 donfig==0.8.1.post1
  av==18.1.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5
)
# what the GPU image already has, of what these wheels require
present="numpy packaging typing-extensions typing_extensions pyyaml torch torchvision regex tqdm huggingface-hub
safetensors timm"

rm -rf "$dest"
mkdir -p "$dest"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$py_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  -d "$dest" "${wheels[@]}"

# every requirement of every wheel is either downloaded here or in the GPU image
have="$present $(for w in "$dest"/*.whl; do basename "$w" | cut -d- -f1 | tr '[:upper:]_' '[:lower:]-'; done)"
have="$(echo "$have" | tr '[:upper:]_' '[:lower:]-')"
missing=""
for w in "$dest"/*.whl; do
  while read -r req; do
    name="$(echo "$req" | sed -E 's/^Requires-Dist: *([A-Za-z0-9_.-]+).*/\1/' | tr '[:upper:]_' '[:lower:]-')"
    [[ " $(echo $have) " == *" $name "* ]] || missing="$missing $name($(basename "$w"))"
  done < <(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true)
done
if [[ -n "$missing" ]]; then
  echo "gpu_wheels.sh: requirements neither downloaded nor on the GPU image:$missing" >&2
  exit 1
fi

# the working tree that travels to the GPU machine is at most 64 MiB, this folder included
size_kib=$(du -sk "$dest" | cut -f1)
if (( size_kib > 56 * 1024 )); then
  echo "gpu_wheels.sh: $dest is $((size_kib / 1024)) MiB; the GPU machine takes 64 MiB in all" >&2
  exit 1
fi
exclude="$repo/.git/info/exclude"
rel="/${dest#"$repo"/}/"
if [[ -d "$repo/.git" && "$dest" == "$repo"/* ]] && ! grep -qxF "$rel" "$exclude" 2>/dev/null; then
  echo "$rel" >> "$exclude"
fi
echo "gpu_wheels.sh: $(ls "$dest" | wc -l) wheels, $((size_kib / 1024)) MiB in $dest"
