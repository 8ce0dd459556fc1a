# Sourced by the *_default.sh chains: `after_sft CONFIG OUT_DIR LABEL` trains the default model by SFT into
# OUT_DIR/sft (skipped when it already has checkpoints, so one SFT run serves several chains), then CONFIG from
# those weights into OUT_DIR, and prints both wall times. $PYTHON overrides the interpreter.
python=${PYTHON:-.venv/bin/python}

after_sft() {
  local config=$1 out=$2 label=$3
  local start=$SECONDS
  if [ ! -d "$out/sft/checkpoints" ]; then
    "$python" -m tunix_core.train configs/base.yml base_output_directory="$out" run_name=sft sample_max_new_tokens=0
  fi
  local sft_done=$SECONDS
  "$python" -m tunix_core.train "$config" base_output_directory="$out" load_parameters_path="$out/sft"
  echo "wall time: SFT $((sft_done - start)) s, $label $((SECONDS - sft_done)) s"
}
