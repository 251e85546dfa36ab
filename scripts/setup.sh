#!/usr/bin/env bash
# Install what nephoscope needs on a Debian 12 host (idempotent): system packages, then a virtualenv.
set -euo pipefail
venv=${1:-.venv}
# libvirt: the daemon and its QEMU driver (not libvirt-daemon-system: that pulls systemd into hosts without an
# init; the test fixtures start virtlogd/libvirtd themselves), virsh, and libvirt-dev + pkg-config so pip builds
# libvirt-python into the venv (Debian's python3-libvirt is built for /usr/bin/python3 and the venv does not
# see system site-packages); mmdebstrap + e2fsprogs (mke2fs -d) build the disk profiles (server, server-tampered)
# gcc, make and libelf1 also build the rootkit profile's kernel module against the lab kernel's Debian headers
# (lab/kmodules.py downloads linux-headers-<release>, its -common and linux-kbuild into the cache, not the host)
apt_packages=(qemu-system-x86 qemu-utils busybox-static cpio zstd gcc make libelf1 libc6-dev bpftool python3 python3-venv
              python3-dev binutils libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
              mmdebstrap e2fsprogs postgresql-15 chromium nftables haproxy iproute2)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ] || [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
  echo "setup: apt-get update" >&2
  apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# what libvirt-daemon-system would create: libvirtd refuses to start its QEMU driver without the user and group
# its build names (libvirt-qemu:libvirt-qemu), and logs to /var/log/libvirt
if [ "$(id -u)" = 0 ]; then
  getent group kvm >/dev/null || groupadd -r kvm
  getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
  getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt \
    -s /usr/sbin/nologin -c "Libvirt Qemu" libvirt-qemu
  mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu
fi
python=$(command -v python3.11 || command -v python3)
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
"$venv/bin/pip" install -q -e '.[dev]'
echo "setup: ready ($("$venv/bin/python" --version), $(qemu-system-x86_64 --version | head -1))" >&2
