# Sourced by the GPU scripts: installs the carried wheels (.whl/, from ../shared/device/wheels.sh) into
# /tmp/site and puts them and the repo on PYTHONPATH; defines `step`.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1

step() {  # step SECONDS COMMAND...: runs one step under a time limit and says how it ended, so that one failure
          # or hang costs only its own step of a device call
  local limit=$1; shift
  echo "=== $* (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@"
  echo "=== rc=$? after $((SECONDS - start))s"
}
