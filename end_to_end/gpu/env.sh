# Sourced by the GPU scripts: installs the carried wheels (.whl/, from ../shared/device/wheels.sh) into
# /tmp/site and puts them and the repo on PYTHONPATH.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
