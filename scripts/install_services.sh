#!/usr/bin/env bash
# Install the real servers the monitoring and Slurm tests run against (Debian packages):
#   prometheus (prometheus, promtool), prometheus-pushgateway, slurm-wlm (slurmctld,
#   slurmd, sbatch, srun, scontrol, ...), munge (munged, munge, unmunge).
# Idempotent: does nothing when every binary is already on PATH. Never starts a service:
# the tests start their own instances on 127.0.0.1 with state in temp dirs.
# Needs root (or sudo) and a Debian/Ubuntu apt; prints what is missing otherwise.
set -euo pipefail

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
have prometheus && have promtool || need_pkgs+=(prometheus)
have prometheus-pushgateway || need_pkgs+=(prometheus-pushgateway)
have slurmctld && have slurmd && have sbatch || need_pkgs+=(slurm-wlm)
have munged || need_pkgs+=(munge)

if [ ${#need_pkgs[@]} -eq 0 ]; then
    echo "install_services: prometheus, pushgateway, slurm, munge already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_services: apt-get not found; install these packages by hand: ${need_pkgs[*]}" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install_services: not root and no sudo; install: ${need_pkgs[*]}" >&2
        exit 1
    fi
fi

# Keep package post-install scripts from starting the system services (ports 9090,
# 9091, 6817/6818 would then be taken by daemons nobody stops). A policy-rc.d that
# exits 101 forbids invoke-rc.d from starting anything; we add one only if none exists.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    added_policy=1
fi
cleanup() { if [ "$added_policy" = 1 ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT

echo "install_services: installing ${need_pkgs[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
