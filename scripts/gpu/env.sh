# Source at the start of every GPU-machine command (see ../shared/device/README.md):
# diffusers/torchao come as wheels in .device/wheels; CXX avoids the static-libstdc++ segfault trap.
export CXX=/usr/bin/g++
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
python3 -c "import torch, diffusers, torchao; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'torchao', torchao.__version__, torch.cuda.get_device_name())"
