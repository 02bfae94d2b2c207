#!/usr/bin/env bash
# The smoke DAG through a real Slurm: every job of `snakemake --profile workflow/profiles/slurm` is submitted by
# Snakemake's Slurm executor plugin to a one-node cluster started here on localhost, and must finish there.
# For CI, on a Debian machine, as root (.ci/run runs it under `timeout -s INT`: Snakemake cancels its jobs on INT):
#     tests/slurm/run_smoke_on_slurm.sh
# It installs slurm-wlm and munge (apt) and the plugin (pip, the project's `slurm` extra, into .venv or $VENV),
# starts munged, slurmctld and slurmd by hand (no systemd) with their key, socket, state and logs in a folder of
# its own and their config in /etc/slurm (the jobs' srun reads only that: the plugin clears SLURM_CONF), runs the
# smoke DAG from an empty working directory in that folder (so every job really runs, whatever results/ holds),
# checks the report, and on any exit stops the daemons it started, by PID, and removes the config it wrote. The
# folder is removed after a pass and kept, with the daemons' logs, after a failure.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
venv=${VENV:-$repo/.venv}
here=$repo/tests/slurm

# --config entries of this run: the urepa ablation trained by 2 CPU processes (accelerate launch, gloo) inside its
# Slurm job, the baseline by one.
smoke_config=("ablations={urepa: {processes: 2}}")

fail() { echo "run_smoke_on_slurm: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root (it installs Debian packages and starts Slurm's daemons); run it as root"
[ -x "$venv/bin/python" ] || fail "no Python environment at $venv; build it as .ci/run does, or set VENV"
node=$(hostname -s)
getent hosts "$node" > /dev/null ||
    fail "this host's short name '$node' does not resolve (Slurm needs it); add it to /etc/hosts"

# --- install -------------------------------------------------------------------------------------------------
if ! command -v slurmctld slurmd sbatch munged mungekey > /dev/null; then
    # No init system here: keep the packages from starting daemons of their own (policy-rc.d: 101 = not allowed).
    added_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && added_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge > /dev/null
    [ -z "$added_policy" ] || rm -f /usr/sbin/policy-rc.d
fi
"$venv/bin/python" -m pip install -q -e "$repo[slurm]"

# --- a one-node cluster in a folder of its own ---------------------------------------------------------------
run_dir=$(mktemp -d /tmp/urepa-slurm.XXXXXX)
cluster=$run_dir/cluster
workdir=$run_dir/workdir
chmod 0755 "$run_dir"  # munged wants every folder above its socket searchable by all
mkdir -p "$cluster/state" "$cluster/spool" "$cluster/log" "$workdir"
mkdir -m 0755 "$cluster/munge"      # the socket
mkdir -m 0700 "$cluster/munge-key"  # the key, the PRNG seed, the log
daemon_pids=()
conf_files=(/etc/slurm/slurm.conf /etc/slurm/gres.conf)
written_conf=()

stop_cluster() {
    local status=$?
    set +e
    if [ ${#daemon_pids[@]} -gt 0 ] && scontrol ping > /dev/null 2>&1; then
        # Jobs left by an interrupted run (the cluster is this script's own): their processes belong to slurmstepd,
        # not to this script, and would outlive the daemons.
        scancel --quiet --user="$(id -un)"
        for _ in $(seq 30); do [ -z "$(squeue --noheader 2> /dev/null)" ] && break; sleep 1; done
    fi
    local pid
    for pid in "${daemon_pids[@]}"; do kill "$pid" 2> /dev/null; done
    for pid in "${daemon_pids[@]}"; do wait "$pid" 2> /dev/null; done
    local alive=()
    for pid in "${daemon_pids[@]}"; do ! kill -0 "$pid" 2> /dev/null || alive+=("$pid"); done
    if [ ${#alive[@]} -gt 0 ]; then
        echo "run_smoke_on_slurm: daemons still running after stop: ${alive[*]}" >&2
        status=1
    else
        echo "run_smoke_on_slurm: stopped munged, slurmctld and slurmd (pids ${daemon_pids[*]:-none})"
    fi
    rm -f "${written_conf[@]}"
    if [ "$status" = 0 ]; then
        rm -rf "$run_dir"
    else
        echo "run_smoke_on_slurm: kept $run_dir (daemon logs in cluster/log, job logs in workdir/.snakemake)" >&2
    fi
    exit "$status"
}
trap stop_cluster EXIT
trap 'exit 143' TERM  # runs stop_cluster too
trap 'exit 130' INT

mungekey --create --keyfile="$cluster/munge-key/munge.key"
# The daemons get a session of their own: `timeout` and Ctrl-C signal the whole process group, and the cluster
# must outlive Snakemake long enough to cancel its jobs, then be stopped here.
setsid munged --foreground --socket="$cluster/munge/munge.socket" --key-file="$cluster/munge-key/munge.key" \
    --pid-file="$cluster/munge/munged.pid" --seed-file="$cluster/munge-key/munged.seed" \
    --log-file="$cluster/munge-key/munged.log" > "$cluster/log/munged.out" 2>&1 &
daemon_pids+=($!)

# A Slurm configuration found in /etc/slurm is another cluster's unless this script wrote it (a killed run).
for conf in "${conf_files[@]}"; do
    ! [ -e "$conf" ] || grep -q "run_smoke_on_slurm" "$conf" ||
        fail "$conf belongs to a Slurm installation of this machine; run this on a machine without one (CI)"
done
# The node as slurmd sees it (CPUs, sockets, cores, memory), so the configuration matches the hardware.
hardware=$(slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //')
mkdir -p /etc/slurm
written_conf=("${conf_files[@]}")
sed -e "s|@DIR@|$cluster|g" -e "s|@NODE@|$node|g" -e "s|@HARDWARE@|$hardware|" \
    "$here/slurm.conf.in" > /etc/slurm/slurm.conf
cp "$here/gres.conf" /etc/slurm/gres.conf

for _ in $(seq 20); do [ -S "$cluster/munge/munge.socket" ] && break; sleep 0.5; done
setsid slurmctld -D > "$cluster/log/slurmctld.out" 2>&1 &
daemon_pids+=($!)
setsid slurmd -D > "$cluster/log/slurmd.out" 2>&1 &
daemon_pids+=($!)

node_state=
for _ in $(seq 60); do
    node_state=$(sinfo --noheader --nodes="$node" --format=%T 2> /dev/null || true)
    [ "$node_state" = idle ] && break
    sleep 1
done
[ "$node_state" = idle ] || fail "node $node is '${node_state:-not reported}' after 60 s, not idle; see $cluster/log"
echo "run_smoke_on_slurm: Slurm $(sinfo --version | cut -d' ' -f2) up: $(sinfo --noheader --Node --format='%N %c CPUs %m MB %G')"

# --- the smoke DAG, every job a Slurm job --------------------------------------------------------------------
# The working directory is empty, so all of the DAG runs; config.yaml is named because it is read from there.
# Status checks every 5 s (the profile keeps the plugin's 40 s): most smoke jobs take seconds.
echo "run_smoke_on_slurm: load before: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s)
(cd "$repo" && "$venv/bin/python" -m snakemake --profile workflow/profiles/slurm --directory "$workdir" \
    --configfile "$repo/config/config.yaml" --slurm-init-seconds-before-status-checks 5 \
    ${smoke_config[@]+--config "${smoke_config[@]}"})
elapsed=$(($(date +%s) - start))
echo "run_smoke_on_slurm: load after: $(cut -d' ' -f1-3 /proc/loadavg)"

test -s "$workdir/results/smoke/report.html" || fail "the run left no results/smoke/report.html"
# Every job went through Slurm: the run's log names as many Slurm job ids as slurmctld saw jobs finish.
log=$(ls -t "$workdir"/.snakemake/log/*.snakemake.log | head -1)
submitted=$(grep -c "has been submitted with SLURM jobid" "$log" || true)
completed=$(grep -c "_job_complete: JobId=[0-9]* done" "$cluster/log/slurmctld.log" || true)
[ "$submitted" -gt 0 ] && [ "$submitted" = "$completed" ] ||
    fail "$submitted jobs submitted to Slurm (per $log), $completed completed (per slurmctld.log)"
echo "run_smoke_on_slurm: the smoke DAG ran as $submitted Slurm jobs in $((elapsed / 60)) min $((elapsed % 60)) s"
