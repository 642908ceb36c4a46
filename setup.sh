#!/usr/bin/env bash
# hyperfence setup: installs what hyperfence needs on Debian 12 (root), then runs one of:
#   ./setup.sh demo     the narrated demo of the papers' experiment (lab of VMs as network namespaces)
#   ./setup.sh test     all checks: ruff, mypy --strict, import-linter, then the whole pytest suite
#   ./setup.sh install  only install
# Idempotent: apt packages are installed only when missing, the virtualenv (.venv) only when pyproject changed.
set -euo pipefail
cd "$(dirname "$0")"
here=$(pwd)

APT_PACKAGES=(nftables libnftables1 iproute2 conntrack iputils-ping tcpdump iperf3 hping3 nmap
              dnsmasq-base ethtool procps python3 python3-venv python3-dev gcc
              libvirt-daemon-system qemu-system-x86 libvirt-dev pkg-config cpio busybox-static kmod)

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

install_venv() {
  # An explicit interpreter: the machine's `python3` may be a pyenv build without Debian's modules.
  local py=/usr/bin/python3
  local stamp=.venv/.hyperfence-installed
  local want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
  fi
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing Python packages into .venv"
    # A first install into a fresh venv has been seen to exit 2 once and succeed on the next try.
    .venv/bin/pip install -q -e ".[dev]" || .venv/bin/pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
  fi
}

install_apt
install_venv
export PATH="$here/.venv/bin:$PATH"

case "${1:-install}" in
  install) echo "setup: done. Run: .venv/bin/hyperfence --help" ;;
  demo) shift; exec hyperfence demo "$@" ;;
  test) shift; exec "$here/scripts/check" "$@" ;;
  *) echo "usage: $0 demo|test|install" >&2; exit 2 ;;
esac
