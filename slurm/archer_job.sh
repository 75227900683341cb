# shellcheck shell=bash
# Shared body of the archer sbatch scripts (train.sbatch, colocated.sbatch,
# disaggregated.sbatch). Sourced by them; `archer submit` inlines it into the rendered
# script. Every knob is an environment variable (docs/slurm.md has the full table);
# resources come from #SBATCH lines or sbatch's command line, never from edits here.
#
#   ARCHER_MODE           train | colocated | disaggregated
#   ARCHER_CONFIG         the run's YAML config (required)
#   ARCHER_HOME           repository / working directory       [$SLURM_SUBMIT_DIR]
#   ARCHER_PYTHON         python with archer-mcore installed    [python3]
#   ARCHER_ENTRY          what torchrun runs, before "CONFIG --resume"
#                                                               [-m archer_mcore.cli train]
#   ARCHER_OVERRIDES      newline-separated key=value config overrides (each becomes -o)
#   ARCHER_NPROC_PER_NODE trainer processes per node            [$SLURM_GPUS_ON_NODE or 8]
#   ARCHER_MASTER_PORT    torchrun c10d rendezvous port         [20000 + job id % 20000]
#   ARCHER_SHUTDOWN_TIMEOUT  seconds torchrun waits for workers to checkpoint after a
#                         stop signal before SIGKILL            [600]
#   ARCHER_REQUEUE_ON_SIGNAL 1: after a SIGUSR1 stop, `scontrol requeue` the job  [1]
#   ARCHER_CONTAINER_IMAGE / ARCHER_CONTAINER_MOUNTS  pyxis/enroot container for srun
#   ARCHER_SRUN_ARGS      extra srun flags for every step
#   ARCHER_PUSHGATEWAY    Pushgateway URL -> metrics.pushgateway
#   ARCHER_PROM_TARGETS_DIR  rank 0 writes a Prometheus file_sd target for itself here;
#                         its exporter (read-only GET /metrics) then listens on its own
#                         node's address (metrics.host=auto), not on every interface
#   ARCHER_METRICS_PORT   rank 0 exporter port when ARCHER_PROM_TARGETS_DIR is set [9400]
#   ARCHER_LOG_DIR        where SGLang server / router logs go  [$SLURM_SUBMIT_DIR]
#   disaggregated only:
#   ARCHER_ROLLOUT_NODES  how many of the job's nodes run SGLang (the first ones)
#   ARCHER_SGLANG_MODEL   --model-path of the servers (required)
#   ARCHER_SGLANG_TP      tensor parallel size per server       [1]
#   ARCHER_SGLANG_GPUS_PER_NODE  GPUs per rollout node          [$ARCHER_NPROC_PER_NODE]
#   ARCHER_SGLANG_PORT    first server port on each node        [30000]
#   ARCHER_ROUTER_PORT    sglang-router port (first rollout node) [30100]
#   ARCHER_ROUTER_METRICS_PORT  the router's own /metrics port     [ARCHER_ROUTER_PORT + 1]
#   ARCHER_ROUTER_POLICY  sglang-router --policy                 [cache_aware]
#   ARCHER_SGLANG_DTYPE   server --dtype (= rollout.sglang.dtype) [bfloat16]
#   ARCHER_SGLANG_MEM_FRACTION  server --mem-fraction-static
#                         (= rollout.sglang.mem_fraction_static)  [0.8]
#   ARCHER_SGLANG_SERVER_CMD  [$ARCHER_PYTHON -m sglang.launch_server]
#   ARCHER_SGLANG_ROUTER_CMD  [$ARCHER_PYTHON -m sglang_router.launch_router]
#   ARCHER_SGLANG_ARGS    extra server flags
#   ARCHER_ROLLOUT_HEALTH_TIMEOUT  seconds to wait for servers + router [900]
#   ARCHER_SGLANG_BIND_HOST  address servers and router listen on [each node's NodeAddr];
#                         0.0.0.0 only if you must (every interface; the key still applies)
#   ARCHER_SECRETS_DIR    shared folder in which the job makes .archer-secrets-<job id>
#                         (0700: its API key file; removed at exit)   [$ARCHER_LOG_DIR]
#   Servers and router get a per-job API key (docs/sglang.md "Network exposure"): the
#   servers read it from a 0600 file (--config), a `PYTHON -m MODULE` router through a
#   -c wrapper (any other router command gets it as flags, visible to ps on its node),
#   the trainer from rollout.sglang.api_key_file; server output is copied to the logs
#   with the key replaced.

set -euo pipefail

archer_log() { echo "[archer $(date -u +%H:%M:%S)] $*"; }
archer_die() { echo "[archer] error: $*" >&2; exit 2; }

: "${SLURM_JOB_ID:?this script runs inside a Slurm job (sbatch)}"
: "${ARCHER_CONFIG:?set ARCHER_CONFIG to the YAML config of the run}"
ARCHER_MODE=${ARCHER_MODE:-train}
ARCHER_HOME=${ARCHER_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
ARCHER_PYTHON=${ARCHER_PYTHON:-python3}
ARCHER_ENTRY=${ARCHER_ENTRY:--m archer_mcore.cli train}
ARCHER_OVERRIDES=${ARCHER_OVERRIDES:-}
ARCHER_NPROC_PER_NODE=${ARCHER_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
ARCHER_MASTER_PORT=${ARCHER_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
ARCHER_SHUTDOWN_TIMEOUT=${ARCHER_SHUTDOWN_TIMEOUT:-600}
ARCHER_REQUEUE_ON_SIGNAL=${ARCHER_REQUEUE_ON_SIGNAL:-1}
ARCHER_CONTAINER_IMAGE=${ARCHER_CONTAINER_IMAGE:-}
ARCHER_CONTAINER_MOUNTS=${ARCHER_CONTAINER_MOUNTS:-}
ARCHER_SRUN_ARGS=${ARCHER_SRUN_ARGS:-}
ARCHER_PUSHGATEWAY=${ARCHER_PUSHGATEWAY:-}
ARCHER_PROM_TARGETS_DIR=${ARCHER_PROM_TARGETS_DIR:-}
ARCHER_METRICS_PORT=${ARCHER_METRICS_PORT:-9400}
ARCHER_LOG_DIR=${ARCHER_LOG_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
case "$ARCHER_MODE" in train | colocated | disaggregated) ;; *)
    archer_die "ARCHER_MODE=$ARCHER_MODE: must be train, colocated or disaggregated" ;;
esac
cd "$ARCHER_HOME"
[ -f "$ARCHER_CONFIG" ] || archer_die "config $ARCHER_CONFIG not found (from $PWD)"

# ---------------------------------------------------------------- NCCL / IB knobs
# Defaults for H800/H100 InfiniBand or RoCE clusters; every one can be set before
# submitting (sbatch exports the environment) and is then left alone.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1} # Megatron TP/SP overlap ordering
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1} # fail fast, don't hang
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}     # IB verbs timeout 4.096us * 2^22 (~17 s)
export NCCL_IB_RETRY_CNT=${NCCL_IB_RETRY_CNT:-7}
# Site-specific, set only when you know the fabric (left unset otherwise):
#   NCCL_IB_HCA=mlx5_0,mlx5_1,...   HCAs to use (H800 nodes: usually 8x 400G, mlx5_*)
#   NCCL_IB_GID_INDEX=3             RoCE v2 GID index
#   NCCL_SOCKET_IFNAME=bond0        bootstrap / TCP interface (also GLOO_SOCKET_IFNAME)
#   NCCL_NET_GDR_LEVEL=PIX          GPUDirect RDMA distance
#   NCCL_IB_QPS_PER_CONNECTION=2, NCCL_NVLS_ENABLE=0 (no NVLink SHARP on H800)
if [ -n "${NCCL_SOCKET_IFNAME:-}" ] && [ -z "${GLOO_SOCKET_IFNAME:-}" ]; then
    export GLOO_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME
fi

# ---------------------------------------------------------------- nodes and addresses
mapfile -t ARCHER_ALL_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
archer_node_addr() { # the address Slurm reaches a node at (NodeAddr), else its name
    local addr
    addr=$(scontrol show node "$1" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
    echo "${addr:-$1}"
}
if [ "$ARCHER_MODE" = disaggregated ]; then
    ARCHER_ROLLOUT_NODES=${ARCHER_ROLLOUT_NODES:?disaggregated mode needs ARCHER_ROLLOUT_NODES}
    if [ "$ARCHER_ROLLOUT_NODES" -lt 1 ] || [ "$ARCHER_ROLLOUT_NODES" -ge "${#ARCHER_ALL_NODES[@]}" ]; then
        archer_die "ARCHER_ROLLOUT_NODES=$ARCHER_ROLLOUT_NODES must be >= 1 and < the job's ${#ARCHER_ALL_NODES[@]} nodes"
    fi
    ARCHER_ROLLOUT_HOSTS=("${ARCHER_ALL_NODES[@]:0:ARCHER_ROLLOUT_NODES}")
    ARCHER_TRAIN_HOSTS=("${ARCHER_ALL_NODES[@]:ARCHER_ROLLOUT_NODES}")
else
    ARCHER_ROLLOUT_HOSTS=()
    ARCHER_TRAIN_HOSTS=("${ARCHER_ALL_NODES[@]}")
fi
ARCHER_TRAIN_NNODES=${#ARCHER_TRAIN_HOSTS[@]}
MASTER_ADDR=$(archer_node_addr "${ARCHER_TRAIN_HOSTS[0]}")
MASTER_PORT=$ARCHER_MASTER_PORT
export MASTER_ADDR MASTER_PORT
ARCHER_TRAIN_NODELIST=$(IFS=,; echo "${ARCHER_TRAIN_HOSTS[*]}")

ARCHER_SRUN_COMMON=(--kill-on-bad-exit=1)
if [ -n "$ARCHER_CONTAINER_IMAGE" ]; then
    ARCHER_SRUN_COMMON+=(--container-image="$ARCHER_CONTAINER_IMAGE" --container-workdir="$ARCHER_HOME")
    [ -n "$ARCHER_CONTAINER_MOUNTS" ] && ARCHER_SRUN_COMMON+=(--container-mounts="$ARCHER_CONTAINER_MOUNTS")
fi
# shellcheck disable=SC2206 # word splitting of the user's extra flags is intended
ARCHER_SRUN_COMMON+=($ARCHER_SRUN_ARGS)

ARCHER_TRAIN_ARGS=("$ARCHER_CONFIG" --resume)
while IFS= read -r ov; do
    [ -n "$ov" ] && ARCHER_TRAIN_ARGS+=(-o "$ov")
done <<<"$ARCHER_OVERRIDES"
[ -n "$ARCHER_PUSHGATEWAY" ] && ARCHER_TRAIN_ARGS+=(-o "metrics.pushgateway=$ARCHER_PUSHGATEWAY")

archer_log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} mode $ARCHER_MODE nodes ${ARCHER_ALL_NODES[*]}"
archer_log "train nodes ${ARCHER_TRAIN_HOSTS[*]} x $ARCHER_NPROC_PER_NODE procs, rendezvous $MASTER_ADDR:$MASTER_PORT"

# ---------------------------------------------------------------- stop signals
# Slurm sends SIGUSR1 to this shell ARCHER_SIGNAL_LEAD seconds before the time limit
# (#SBATCH --signal=B:USR1@secs; by hand: scancel --batch --signal=USR1 <job>), and
# SIGTERM on pre-emption / scancel. The signal goes to the training step only (its
# srun forwards it to torchrun, which forwards it to every worker): the rollout servers
# and the router keep running, so the trainer can finish its weight sync and write its
# checkpoint; the EXIT trap stops them after the training step has exited. After
# SIGUSR1 the job requeues itself and the next run resumes (--resume); after SIGTERM
# Slurm decides (pre-emption requeues a --requeue job, scancel ends it).
ARCHER_STOP_SIGNAL=""
ARCHER_TRAIN_PID=""
ARCHER_BG_PIDS=()
# shellcheck disable=SC2317 # trap handlers are invoked indirectly
archer_on_signal() {
    ARCHER_STOP_SIGNAL=$1
    if [ -n "$ARCHER_TRAIN_PID" ]; then
        archer_log "received SIG$1: asking the training step to checkpoint and stop"
        kill -s "$1" "$ARCHER_TRAIN_PID" 2>/dev/null || true
    else
        archer_log "received SIG$1 before training started: not starting it"
    fi
}
trap 'archer_on_signal USR1' USR1
trap 'archer_on_signal TERM' TERM
# shellcheck disable=SC2317
archer_cleanup() {
    local pid
    [ "${#ARCHER_BG_PIDS[@]}" -eq 0 ] || archer_log "stopping the rollout servers and router"
    for pid in "${ARCHER_BG_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -n "$ARCHER_PROM_TARGETS_DIR" ] && rm -f "$ARCHER_PROM_TARGETS_DIR/$SLURM_JOB_ID.json"
    [ -n "${ARCHER_JOB_SECRETS:-}" ] && rm -rf "$ARCHER_JOB_SECRETS"
    return 0
}
trap archer_cleanup EXIT

ARCHER_WAIT_RC=0
archer_wait() { # wait for a pid through trapped signals; its status -> ARCHER_WAIT_RC
    local pid=$1
    while :; do
        wait "$pid" && ARCHER_WAIT_RC=0 || ARCHER_WAIT_RC=$?
        kill -0 "$pid" 2>/dev/null || break
    done
}

# ---------------------------------------------------------------- Prometheus target
if [ -n "$ARCHER_PROM_TARGETS_DIR" ]; then
    # read-only /metrics, reachable where Prometheus scrapes it: rank 0 binds its own
    # node's address (torchrun may place it on any training node) and writes the file_sd
    # target $ARCHER_PROM_TARGETS_DIR/$SLURM_JOB_ID.json naming it (removed at its exit;
    # the EXIT trap removes one a crashed trainer left)
    mkdir -p "$ARCHER_PROM_TARGETS_DIR"
    ARCHER_TRAIN_ARGS+=(-o "metrics.host=auto" -o "metrics.port=$ARCHER_METRICS_PORT"
                        -o "metrics.targets_dir=$ARCHER_PROM_TARGETS_DIR")
fi

# ---------------------------------------------------------------- rollout servers
if [ "$ARCHER_MODE" = disaggregated ]; then
    : "${ARCHER_SGLANG_MODEL:?disaggregated mode needs ARCHER_SGLANG_MODEL (server --model-path)}"
    ARCHER_SGLANG_TP=${ARCHER_SGLANG_TP:-1}
    ARCHER_SGLANG_GPUS_PER_NODE=${ARCHER_SGLANG_GPUS_PER_NODE:-$ARCHER_NPROC_PER_NODE}
    ARCHER_SGLANG_PORT=${ARCHER_SGLANG_PORT:-30000}
    ARCHER_ROUTER_PORT=${ARCHER_ROUTER_PORT:-30100}
    ARCHER_ROUTER_POLICY=${ARCHER_ROUTER_POLICY:-cache_aware}
    ARCHER_SGLANG_DTYPE=${ARCHER_SGLANG_DTYPE:-bfloat16}
    ARCHER_SGLANG_MEM_FRACTION=${ARCHER_SGLANG_MEM_FRACTION:-0.8}
    ARCHER_SGLANG_SERVER_CMD=${ARCHER_SGLANG_SERVER_CMD:-$ARCHER_PYTHON -m sglang.launch_server}
    ARCHER_SGLANG_ROUTER_CMD=${ARCHER_SGLANG_ROUTER_CMD:-$ARCHER_PYTHON -m sglang_router.launch_router}
    ARCHER_SGLANG_ARGS=${ARCHER_SGLANG_ARGS:-}
    ARCHER_ROLLOUT_HEALTH_TIMEOUT=${ARCHER_ROLLOUT_HEALTH_TIMEOUT:-900}
    ARCHER_SERVERS_PER_NODE=$((ARCHER_SGLANG_GPUS_PER_NODE / ARCHER_SGLANG_TP))
    [ "$ARCHER_SERVERS_PER_NODE" -ge 1 ] || ARCHER_SERVERS_PER_NODE=1
    ARCHER_SGLANG_BIND_HOST=${ARCHER_SGLANG_BIND_HOST:-}
    # token ids in, token ids out; logprobs of the sampling temperature
    export SGLANG_RETURN_ORIGINAL_LOGPROB=false

    # the job's API key: made and written by shell builtins (no command line carries it),
    # in a 0600 file that is both SGLang's --config and rollout.sglang.api_key_file; a
    # sed script (0600 too) replaces it in the server output copied to the logs
    ARCHER_JOB_SECRETS=${ARCHER_SECRETS_DIR:-$ARCHER_LOG_DIR}/.archer-secrets-$SLURM_JOB_ID
    rm -rf "$ARCHER_JOB_SECRETS" # a previous run of this (requeued) job
    mkdir -p "$(dirname "$ARCHER_JOB_SECRETS")"
    # a fresh folder of ours, or stop (never write the key into one someone else made)
    (umask 077 && mkdir "$ARCHER_JOB_SECRETS") || archer_die "cannot create $ARCHER_JOB_SECRETS"
    ARCHER_SGLANG_API_KEY=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
    [ ${#ARCHER_SGLANG_API_KEY} -eq 64 ] || archer_die "could not make an API key from /dev/urandom"
    ARCHER_SGLANG_KEY_FILE=$ARCHER_JOB_SECRETS/sglang_api_key.yaml
    (umask 077 && printf 'api-key: %s\n' "$ARCHER_SGLANG_API_KEY" >"$ARCHER_SGLANG_KEY_FILE" &&
        printf 's/%s/<redacted>/g\n' "$ARCHER_SGLANG_API_KEY" >"$ARCHER_JOB_SECRETS/redact.sed")
    # = archer_mcore.rollout.sglang_launcher.ROUTER_KEY_WRAPPER (tests/slurm checks it)
    ARCHER_ROUTER_KEY_WRAPPER="import runpy, sys; f, m = sys.argv[1], sys.argv[2]; k = open(f).read().split(':', 1)[-1].strip(); sys.argv = [m, *sys.argv[3:], '--api-key', k, '--control-plane-api-keys', 'archer:archer:admin:' + k]; runpy.run_module(m, run_name='__main__', alter_sys=True)"

    # the trainer's variables stay out of the servers' and router's steps (srun passes
    # its own environment on): Megatron's CUDA_DEVICE_MAX_CONNECTIONS=1 and the
    # rendezvous address of the training step
    ARCHER_SERVER_ENV_UNSET=(-u CUDA_DEVICE_MAX_CONNECTIONS -u MASTER_ADDR -u MASTER_PORT)
    ARCHER_SERVER_URLS=()
    for host in "${ARCHER_ROLLOUT_HOSTS[@]}"; do
        addr=$(archer_node_addr "$host")
        for ((k = 0; k < ARCHER_SERVERS_PER_NODE; k++)); do
            port=$((ARCHER_SGLANG_PORT + k))
            ARCHER_SERVER_URLS+=("http://$addr:$port")
            # Server k takes GPUs k*TP .. k*TP+TP-1 of those the step sees (--base-gpu-id
            # counts in the step's CUDA_VISIBLE_DEVICES, which a step with GPU GRES sets
            # itself: a CUDA_VISIBLE_DEVICES set outside the step would be replaced, and
            # every server would start on the node's first TP GPUs)
            # shellcheck disable=SC2086 # the command and extra args are word lists
            env "${ARCHER_SERVER_ENV_UNSET[@]}" \
                srun --nodes=1 --ntasks=1 --nodelist="$host" --overlap \
                "${ARCHER_SRUN_COMMON[@]}" \
                $ARCHER_SGLANG_SERVER_CMD --model-path "$ARCHER_SGLANG_MODEL" \
                --base-gpu-id $((k * ARCHER_SGLANG_TP)) \
                --host "${ARCHER_SGLANG_BIND_HOST:-$addr}" --config "$ARCHER_SGLANG_KEY_FILE" \
                --port "$port" --tp-size "$ARCHER_SGLANG_TP" --skip-tokenizer-init \
                --dtype "$ARCHER_SGLANG_DTYPE" --mem-fraction-static "$ARCHER_SGLANG_MEM_FRACTION" \
                $ARCHER_SGLANG_ARGS \
                > >(sed -u -f "$ARCHER_JOB_SECRETS/redact.sed" >"$ARCHER_LOG_DIR/sglang-$SLURM_JOB_ID-$host-$port.log") 2>&1 &
            ARCHER_BG_PIDS+=($!)
        done
    done
    router_host=${ARCHER_ROLLOUT_HOSTS[0]}
    router_addr=$(archer_node_addr "$router_host")
    ARCHER_SGLANG_ROUTER_URL="http://$router_addr:$ARCHER_ROUTER_PORT"
    export ARCHER_SGLANG_ROUTER_URL
    read -r -a router_cmd <<<"$ARCHER_SGLANG_ROUTER_CMD"
    # the router's own metrics exporter binds the router's address too (sglang-router
    # 0.3.2 would listen on 0.0.0.0:29000: every interface, one fixed port per node)
    router_flags=(--worker-urls "${ARCHER_SERVER_URLS[@]}" --policy "$ARCHER_ROUTER_POLICY"
        --host "${ARCHER_SGLANG_BIND_HOST:-$router_addr}" --port "$ARCHER_ROUTER_PORT"
        --prometheus-host "${ARCHER_SGLANG_BIND_HOST:-$router_addr}"
        --prometheus-port "${ARCHER_ROUTER_METRICS_PORT:-$((ARCHER_ROUTER_PORT + 1))}")
    if [ "${#router_cmd[@]}" -eq 3 ] && [ "${router_cmd[1]}" = -m ]; then
        router_cmd=("${router_cmd[0]}" -c "$ARCHER_ROUTER_KEY_WRAPPER" "$ARCHER_SGLANG_KEY_FILE" "${router_cmd[2]}")
    else # sglang-router reads keys from flags only: visible to ps on the router's node
        router_flags+=(--api-key "$ARCHER_SGLANG_API_KEY"
            --control-plane-api-keys "archer:archer:admin:$ARCHER_SGLANG_API_KEY")
    fi
    env "${ARCHER_SERVER_ENV_UNSET[@]}" \
        srun --nodes=1 --ntasks=1 --nodelist="$router_host" --overlap "${ARCHER_SRUN_COMMON[@]}" \
        "${router_cmd[@]}" "${router_flags[@]}" \
        > >(sed -u -f "$ARCHER_JOB_SECRETS/redact.sed" >"$ARCHER_LOG_DIR/sglang-router-$SLURM_JOB_ID.log") 2>&1 &
    ARCHER_BG_PIDS+=($!)
    archer_log "waiting for ${#ARCHER_SERVER_URLS[@]} SGLang server(s) and router $ARCHER_SGLANG_ROUTER_URL"
    deadline=$((SECONDS + ARCHER_ROLLOUT_HEALTH_TIMEOUT))
    for url in "${ARCHER_SERVER_URLS[@]}" "$ARCHER_SGLANG_ROUTER_URL"; do
        until "$ARCHER_PYTHON" -c "import sys, urllib.request as u; u.urlopen(sys.argv[1] + '/health', timeout=5)" "$url" 2>/dev/null; do
            [ "$SECONDS" -lt "$deadline" ] || archer_die "$url not healthy after ${ARCHER_ROLLOUT_HEALTH_TIMEOUT}s"
            [ -z "$ARCHER_STOP_SIGNAL" ] || exit 0
            sleep 2
        done
    done
    urls_yaml=$(printf '"%s",' "${ARCHER_SERVER_URLS[@]}")
    tps_yaml=$(printf "$ARCHER_SGLANG_TP,%.0s" "${ARCHER_SERVER_URLS[@]}")
    # rollout.sglang.master_address stays unset: torchrun's rendezvous need not put rank 0
    # on the first training node, so rank 0 finds its own address where it runs (the
    # NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME interface, else its route to the servers)
    ARCHER_TRAIN_ARGS+=(-o "rollout.engine=sglang" -o "rollout.mode=disaggregated"
        -o "rollout.sglang.server_urls=[${urls_yaml%,}]"
        -o "rollout.sglang.server_tp_sizes=[${tps_yaml%,}]"
        -o "rollout.sglang.router_url=$ARCHER_SGLANG_ROUTER_URL"
        -o "rollout.sglang.api_key_file=$ARCHER_SGLANG_KEY_FILE"
        -o "rollout.sglang.dtype=$ARCHER_SGLANG_DTYPE"
        -o "rollout.sglang.mem_fraction_static=$ARCHER_SGLANG_MEM_FRACTION")
fi

if [ "$ARCHER_MODE" = colocated ]; then
    # colocated servers share the trainer's GPUs: weights go by CUDA IPC handles (an NCCL
    # group would hold two ranks on GPU 0, which NCCL refuses; config/checks.py)
    ARCHER_TRAIN_ARGS+=(-o "rollout.engine=sglang" -o "rollout.mode=colocated"
                        -o "rollout.weight_sync=tensor")
fi

# ---------------------------------------------------------------- training
# One torchrun per training node; c10d rendezvous on the first training node.
if [ -z "$ARCHER_STOP_SIGNAL" ]; then
# shellcheck disable=SC2086 # ARCHER_ENTRY is a word list ("-m module sub" or a script)
srun --nodes="$ARCHER_TRAIN_NNODES" --ntasks="$ARCHER_TRAIN_NNODES" --ntasks-per-node=1 \
    --nodelist="$ARCHER_TRAIN_NODELIST" "${ARCHER_SRUN_COMMON[@]}" \
    "$ARCHER_PYTHON" -m torch.distributed.run \
    --nnodes="$ARCHER_TRAIN_NNODES" --nproc-per-node="$ARCHER_NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
    --max-restarts=0 --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="$ARCHER_SHUTDOWN_TIMEOUT" \
    $ARCHER_ENTRY "${ARCHER_TRAIN_ARGS[@]}" &
ARCHER_TRAIN_PID=$!
# a signal that came while srun was starting found no pid to forward to
[ -n "$ARCHER_STOP_SIGNAL" ] && kill -s "$ARCHER_STOP_SIGNAL" "$ARCHER_TRAIN_PID" 2>/dev/null
archer_wait "$ARCHER_TRAIN_PID"
ARCHER_TRAIN_RC=$ARCHER_WAIT_RC
archer_log "training step exited with status $ARCHER_TRAIN_RC"
else
    ARCHER_TRAIN_RC=0
fi

if [ -n "$ARCHER_STOP_SIGNAL" ]; then
    # (torchrun exits 1 after forwarding a signal even when every worker checkpointed
    # and exited 0: the trainer's own log says what it saved)
    if [ "$ARCHER_STOP_SIGNAL" = USR1 ] && [ "$ARCHER_REQUEUE_ON_SIGNAL" = 1 ]; then
        archer_log "training stopped on SIGUSR1; requeueing job $SLURM_JOB_ID to resume from its newest checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit 0
fi
exit "$ARCHER_TRAIN_RC"
