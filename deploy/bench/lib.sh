# shellcheck shell=bash
# What the one-command wrappers in deploy/bench (array.sh, client.sh,
# memory.sh, peers.sh, recovery.sh, throttle.sh) share; sourced, not run.
# A wrapper sets the bench_* settings that are its own, then ends with
#
#   bench_run NAME.sh SCRIPT.py "$@"
#
# which takes --no-build out of the arguments, checks the tools, builds the
# release binaries (unless the arguments only ask for help or name prebuilt
# binaries) and execs python3 SCRIPT.py with the remaining arguments.

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bench_root=$(cd "$bench_dir/../.." && pwd)
# shellcheck disable=SC2034 # read by the wrappers
bench_target=${CARGO_TARGET_DIR:-$bench_root/target}

# Programs that must be on PATH, checked even for --help.
bench_tools=()
# Options that only print (as -h and --help do), so nothing is built.
bench_print_only=()
# OPTION VALUE given to the script before the user's arguments, unless the
# user gives OPTION (or OPTION=...): then those binaries are used and
# nothing is built.
bench_bin=()
# Arguments always given to the script before the user's.
bench_first=()
# What `cargo build --release` is given; empty: nothing to build.
bench_cargo=()
# What is built, for the message "building ... (release)"; empty: none.
bench_building=
# The name of a variable exported with the command as typed
# (deploy/bench/NAME.sh ARGS...), which the script prints in its report.
bench_report=
# NAME=VALUE pairs exported for the script (after the build).
bench_env=()

# bench_run NAME SCRIPT ARG...: the wrapper NAME (for messages) runs
# SCRIPT (in this directory) with ARG... as described above; never returns.
# Exits 1 when a tool is missing, with cargo's status when the build fails.
bench_run() {
  local name=$1 script=$2
  shift 2
  local build=1 args=() bin=("${bench_bin[@]}") a o tool
  for a in "$@"; do
    case $a in
      --no-build) build=0; continue ;;
      -h | --help) build=0 ;;
    esac
    for o in "${bench_print_only[@]}"; do
      if [[ $a == "$o" ]]; then build=0; fi
    done
    if ((${#bench_bin[@]})) && [[ $a == "${bench_bin[0]}" || $a == "${bench_bin[0]}="* ]]; then
      build=0 bin=()
    fi
    args+=("$a")
  done

  for tool in "${bench_tools[@]}"; do
    command -v "$tool" >/dev/null || { echo "$name: $tool is required" >&2; exit 1; }
  done
  if ((build && ${#bench_cargo[@]})); then
    if [[ -n $bench_building ]]; then echo "building $bench_building (release)" >&2; fi
    (cd "$bench_root" && cargo build --release "${bench_cargo[@]}")
  fi

  if [[ -n $bench_report ]]; then
    # As typed, --no-build included; the script also sees bench_bin.
    export "$bench_report=deploy/bench/$name$(printf ' %q' "$@")"
  fi
  if ((${#bench_env[@]})); then export "${bench_env[@]}"; fi
  exec python3 "$bench_dir/$script" "${bench_first[@]}" "${bin[@]}" "${args[@]}"
}
