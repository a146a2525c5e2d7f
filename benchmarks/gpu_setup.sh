# Sourced by the GPU scripts: $out made, the wheels of .whl/ (../shared/tools/gpu/fetch-wheels.sh) put on PYTHONPATH
# where there are any, and the device and versions written to $out/device.txt.
out=${OUT:-gpu-results}
mkdir -p "$out"
if [ -d .whl ]; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH=$site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, diffusers, opacus; print(torch.__version__, diffusers.__version__, opacus.__version__)" \
  | tee -a "$out/device.txt"
