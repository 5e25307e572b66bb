#!/usr/bin/env bash
# Runs one saejax launch script on every worker of a Cloud TPU pod slice (one jax process
# per TPU VM host; jax.distributed.initialize() auto-detects the slice on TPU VMs).
#
#   launch/multihost/tpu_pod.sh --tpu=my-v4-32 --zone=us-central2-b --setup \
#       --repo=https://github.com/you/saejax.git -- launch/train_sae.py --config=experiments/sae_paper.py
#
# Every option may also be given as an environment variable (in brackets below).
# See docs/SCALING.md and BUILD.md ("Multi-host").
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/multihost/tpu_pod.sh [options] [--] SCRIPT [ARGS...]

Runs `python SCRIPT ARGS --config.distributed.enabled=true` in REMOTE_DIR on all workers
of a TPU VM slice with `gcloud compute tpus tpu-vm ssh --worker=all`.

Options (environment variable in brackets):
  --tpu=NAME        TPU VM (slice) name                                  [TPU_NAME]   required
  --zone=ZONE       its zone, e.g. us-central2-b                         [ZONE]       required
  --project=ID      gcloud project (default: gcloud's configured one)    [PROJECT]
  --setup           first clone/update the repo, make .venv and install
                    saejax plus jax[tpu] on every worker                 [SETUP=1]
  --setup-only      only do the set-up                                   [SETUP_ONLY=1]
  --repo=URL        git URL to clone (needed by --setup)                 [REPO_URL]
  --ref=REF         branch, tag or commit to check out (default: main)   [REPO_REF]
  --dir=DIR         checkout on the workers (default: saejax, in ~)      [REMOTE_DIR]
  --jax=SPEC        pip requirement for jax on TPU                       [JAX_SPEC]
                    (default: jax[tpu]>=0.7,<0.13, as pyproject.toml)
  --dry-run         print the gcloud commands instead of running them    [DRY_RUN=1]
  -h, --help        this message

SCRIPT is relative to the checkout (e.g. launch/train_sae.py, launch/harvest.py);
--config.distributed.enabled=true is appended unless ARGS already set it.
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
SETUP=${SETUP:-0}
SETUP_ONLY=${SETUP_ONLY:-0}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-main}
REMOTE_DIR=${REMOTE_DIR:-saejax}
JAX_SPEC=${JAX_SPEC:-jax[tpu]>=0.7,<0.13}
DRY_RUN=${DRY_RUN:-0}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) TPU_NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --repo=*) REPO_URL=${1#*=} ;;
    --ref=*) REPO_REF=${1#*=} ;;
    --dir=*) REMOTE_DIR=${1#*=} ;;
    --jax=*) JAX_SPEC=${1#*=} ;;
    --setup) SETUP=1 ;;
    --setup-only) SETUP=1; SETUP_ONLY=1 ;;
    --dry-run|--dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) usage >&2; die "unknown option: $1" ;;
    *) break ;;
  esac
  shift
done

[[ -n "$TPU_NAME" ]] || { usage >&2; die "--tpu (TPU_NAME) is required"; }
[[ -n "$ZONE" ]] || { usage >&2; die "--zone (ZONE) is required"; }
if [[ "$SETUP_ONLY" != 1 && $# -eq 0 ]]; then
  usage >&2; die "no SCRIPT given"
fi
if [[ "$SETUP" == 1 && -z "$REPO_URL" ]]; then
  die "--setup needs --repo (REPO_URL), the git URL the workers clone"
fi

# Words -> one string the remote bash parses back into the same words.
quote() { local out="" w; for w in "$@"; do out+="$(printf '%q' "$w") "; done; printf '%s' "${out% }"; }

# A word as a human would type it: bare if safe, else single-quoted (dry-run display).
show() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"
  else local sq="'\\''"; printf "'%s'" "${1//\'/$sq}"; fi
}

gcloud_ssh() {  # gcloud_ssh REMOTE_COMMAND: run it on all workers (or print it)
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE")
  [[ -n "$PROJECT" ]] && cmd+=("--project=$PROJECT")
  cmd+=(--worker=all "--command=$1")
  if [[ "$DRY_RUN" == 1 ]]; then
    local w line=""
    for w in "${cmd[@]}"; do line+="$(show "$w") "; done
    echo "${line% }"
  else
    command -v gcloud >/dev/null || die "gcloud not found (install the Google Cloud CLI)"
    "${cmd[@]}"
  fi
}

DIR_Q=$(quote "$REMOTE_DIR")

if [[ "$SETUP" == 1 ]]; then
  # Idempotent: clone once, then fetch and check out REF (branch, tag or commit).
  SETUP_CMD="set -euo pipefail; cd ~; \
if [ ! -d $DIR_Q/.git ]; then git clone $(quote "$REPO_URL") $DIR_Q; fi; \
cd $DIR_Q && git fetch --quiet origin $(quote "$REPO_REF") && git checkout --quiet --detach FETCH_HEAD; \
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi; \
.venv/bin/python -m pip install --quiet --upgrade pip; \
.venv/bin/python -m pip install --quiet -e . $(quote "$JAX_SPEC"); \
.venv/bin/python -c 'import jax; print(jax.__version__, jax.local_devices())'"
  gcloud_ssh "$SETUP_CMD"
fi

[[ "$SETUP_ONLY" == 1 ]] && exit 0

ARGS=("$@")
case " ${ARGS[*]} " in
  *" --config.distributed.enabled"*) ;;
  *) ARGS+=("--config.distributed.enabled=true") ;;
esac
RUN_CMD="set -euo pipefail; cd ~ && cd $DIR_Q && exec .venv/bin/python $(quote "${ARGS[@]}")"
gcloud_ssh "$RUN_CMD"
