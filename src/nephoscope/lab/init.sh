#!/bin/busybox sh
# nephoscope lab guest init (pid 1). Mounts the basics, loads modules, brings up the network,
# starts the profile's services, reports every process over the serial console, then serves a shell.
/bin/busybox --install -s 2>/dev/null
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /run /tmp /var/log/lab /root
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
hostname "$(cat /etc/hostname)"
echo "NPH-STAGE modules"
while read -r mod; do insmod "/lib/modules/$(uname -r)/$mod" 2>/dev/null || echo "NPH-WARN insmod $mod failed"; done < /etc/nephoscope/modules
ip link set lo up
ip link set eth0 up 2>/dev/null && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
QGA_PORT=""
for d in /sys/class/virtio-ports/*; do
  [ -e "$d/name" ] && [ "$(cat "$d/name")" = org.qemu.guest_agent.0 ] && QGA_PORT="/dev/${d##*/}"
done
export QGA_PORT
echo "NPH-STAGE services"
: > /run/nph-tags
for setup in /etc/nephoscope/setup/*.sh; do [ -e "$setup" ] && sh "$setup" </dev/null; done
for svc in /etc/nephoscope/services/*.sh; do
  case "$svc" in *.after.sh) continue ;; esac
  tag=$(basename "$svc" .sh); tag=${tag#*-}
  sh "$svc" </dev/null >"/var/log/lab/$tag.log" 2>&1 &
  PID=$!
  echo "$tag $PID" >> /run/nph-tags
  if [ -e "${svc%.sh}.after.sh" ]; then
    sleep 1
    PID=$PID sh "${svc%.sh}.after.sh" </dev/null >>"/var/log/lab/$tag.log" 2>&1
  fi
done
sleep 2
b64() { base64 | tr -d '\n'; }
echo "NPH-KERNEL $(uname -r | b64) $(b64 < /proc/cmdline)"
while read -r tag pid; do echo "NPH-TAG $tag $pid"; done < /run/nph-tags
for d in /proc/[0-9]*; do
  pid=${d#/proc/}
  exe=$(readlink "$d/exe") || continue
  ppid=""
  while read -r key value; do [ "$key" = "PPid:" ] && ppid=$value && break; done < "$d/status"
  echo "NPH-PROC $pid $ppid $(b64 < "$d/comm") $(printf %s "$exe" | b64) $(b64 < "$d/cmdline")"
done
echo "NPH-READY"
while true; do setsid cttyhack sh -l; sleep 1; done
