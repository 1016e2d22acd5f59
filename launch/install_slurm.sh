#!/usr/bin/env bash
# Installs a single-machine SLURM (controller, node daemon, clients) and munge, for launch/slurm/ and
# tests/test_slurm.py. Idempotent: does nothing when the packages are already there. `apt-get update` runs only when
# the install fails (a stale or empty package list), because it is the slow part.
set -euo pipefail

PACKAGES="slurmctld slurmd slurm-client munge"
missing=""
for pkg in $PACKAGES; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -z "$missing" ]; then
  echo "install_slurm: already installed ($PACKAGES)"
  exit 0
fi

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "install_slurm: installing$missing"
# shellcheck disable=SC2086 # $missing is a list of package names
# Nothing is started here: the packages' services are not enabled in containers, and the tests start their own daemons.
if ! $SUDO apt-get install -y -qq --no-install-recommends $missing; then
  echo "install_slurm: install failed, refreshing the package lists and retrying"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO apt-get install -y -qq --no-install-recommends $missing
fi
for pkg in $PACKAGES; do
  dpkg -s "$pkg" >/dev/null 2>&1 || { echo "install_slurm: $pkg still not installed" >&2; exit 1; }
done
echo "install_slurm: done"
