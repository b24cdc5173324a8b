#!/bin/bash
# Device, first call: snapshot the repo to /tmp/repo (later calls' trees are replaced; background jobs run from
# the snapshot) and install it and any carried wheels (.gpu-carry/whl) into /tmp/twsite. Only /tmp survives
# between calls, and only while the machine stays warm.
set -e
rm -rf /tmp/repo && mkdir -p /tmp/repo /tmp/q && tar cf - --exclude=.gpu-carry --exclude=.git . | tar xf - -C /tmp/repo
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/twsite /tmp/repo 2>&1 | grep -v -i warn || true
if ls .gpu-carry/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/twsite .gpu-carry/whl/*.whl 2>&1 | grep -v -i warn || true
fi
PYTHONPATH=/tmp/twsite python3 -c "import twla_offline, twla_vllm, torch; print('installed;', torch.cuda.get_device_name())"
