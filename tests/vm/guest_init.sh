#!/bin/bash
# PID 1 of the ixyd test guest (stage 2, started by the initramfs with switch_root).
# The root is the host's, read-only over 9p. The host's run directory is the writable 9p
# share `out`; its path comes as ixydvm_out= on the kernel command line, and it holds:
#   config       (from the host) KROOT, MODULES, WORKDIR, DEADLINE, GUEST_ENV
#   command.sh   (from the host) what to run
#   output       the command's stdout + stderr
#   dmesg        the guest kernel log after the command
#   rc           the command's exit code; written last: no rc = no result
#   timedout     present when the command hit DEADLINE
#   boot         guest uptime in seconds when the command started
#   setup-error  why the command was not started
# Never exits: PID 1 exiting panics the kernel. Ends with a sysrq power-off.
PATH=/usr/sbin:/usr/bin:/sbin:/bin

power_off() {
    sync
    echo o > /proc/sysrq-trigger   # immediate power-off: there is no init system to ask
    while :; do sleep 1; done
}

# Reports on the console (and in the share when it is mounted) and powers off.
setup_failed() {
    echo "guest-init: $*"
    [[ -n "${OUT:-}" ]] && mountpoint -q "$OUT" && echo "$*" > "$OUT/setup-error"
    power_off
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev   # the initramfs moved its /dev here
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
# /tmp and /var/tmp: the host's files stay visible (a clone of the repo or the harness's
# cache may live there), writes go to a tmpfs overlay and vanish with the guest.
for dir in /tmp /var/tmp; do
    layer="/run/ixyd-overlay${dir//\//-}"
    mkdir -p "$layer/upper" "$layer/work"
    mount -t overlay overlay -o "lowerdir=$dir,upperdir=$layer/upper,workdir=$layer/work" "$dir" \
        || mount -t tmpfs tmpfs "$dir"
done

OUT=
for word in $(< /proc/cmdline); do
    case "$word" in ixydvm_out=*) OUT="${word#ixydvm_out=}" ;; esac
done
[[ -n "$OUT" ]] || setup_failed "no ixydvm_out= on the kernel command line"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out "$OUT" \
    || setup_failed "cannot mount the out share on $OUT"
# shellcheck source=/dev/null  # written by harness.py for each run
source "$OUT/config" || setup_failed "cannot read $OUT/config"

# VFIO pins the DMA memory it maps against RLIMIT_MEMLOCK.
ulimit -l unlimited
# Guest modules are not under the 9p root's /lib/modules; ignore the host's modprobe.d.
mkdir -p /run/ixyd-empty-modprobe.d
# shellcheck disable=SC2086  # MODULES is a list
modprobe -C /run/ixyd-empty-modprobe.d -d "$KROOT" -a $MODULES 2> /run/modprobe.err \
    || setup_failed "modprobe -d $KROOT -a $MODULES: $(< /run/modprobe.err)"

cd "$WORKDIR" || setup_failed "cannot cd to $WORKDIR"
read -r uptime _ < /proc/uptime
echo "$uptime" > "$OUT/boot"
budget=$(awk -v d="$DEADLINE" -v u="$uptime" 'BEGIN { b = d - u; printf "%.1f", (b < 1 ? 1 : b) }')
started=$(date +%s.%N)
timeout -k 2 "$budget" env -i "${GUEST_ENV[@]}" bash "$OUT/command.sh" > "$OUT/output" 2>&1 < /dev/null
rc=$?
ended=$(date +%s.%N)
if ((rc == 124 || rc == 137)) && awk -v s="$started" -v e="$ended" -v b="$budget" 'BEGIN { exit !(e - s >= b) }'; then
    echo "command stopped after ${budget} s" > "$OUT/timedout"
fi
dmesg > "$OUT/dmesg" 2>&1
echo "$rc" > "$OUT/rc"
power_off
