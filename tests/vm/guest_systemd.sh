#!/bin/bash
# The ixyd test guest with systemd as init (harness.py run_in_guest(init="systemd")).
#
# `guest_systemd.sh` (no argument) is stage 2, started as PID 1 by the initramfs with
# switch_root. The root is an overlay: the host's root (9p, read-only) under a tmpfs, so
# systemd can write /etc, /var and /run and every write vanishes with the guest. It
# prepares that root and execs systemd into ixyd-vm.target: basic.target plus
# ixyd-vm-command.service, which runs `guest_systemd.sh run OUT`. That writes the same
# files into the `out` share as guest_init.sh does (config and command.sh come from the
# host; output, dmesg, rc, timedout, setup-error go back), plus:
#   journal      the guest's journal (journalctl -b) after the command
#   boot         guest uptime in seconds when the command started
# and ends the unit, whose SuccessAction/FailureAction powers the guest off.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
SELF=$(readlink -f "$0")

# Units the guest cannot use, or that would only slow the boot. The guest boots into its
# own target (not multi-user.target), so the host's services are not started anyway; these
# are what sysinit/basic.target would still pull in. The masks go into the overlay's
# /etc/systemd/system, which beats the host's own unit files there.
MASKED_UNITS=(
    # empties /tmp and /var/tmp, which are the host's (lower layer) here: tens of seconds
    # over 9p, and a clone of the repo may live there
    systemd-tmpfiles-setup.service
    systemd-tmpfiles-clean.timer
    timers.target               # apt-daily, man-db, fstrim, ... of the host
    systemd-timesyncd.service   # no network
    systemd-firstboot.service
    systemd-logind.service      # nothing logs in; a poweroff would wait for it
    getty.target
    serial-getty@ttyS0.service  # no udev: dev-ttyS0.device never appears, 90 s wait
    getty@tty1.service
    # udevd itself runs (ixyd's udev rule is tested, and ixyd-host waits for udev as on a
    # host), but without coldplug of every device, which only costs boot time
    systemd-udev-trigger.service
    systemd-udev-settle.service
    # creates /dev/vfio/vfio (and the other nodes of modules.devname) as root 0600 before
    # the module is loaded; on a host, udev then gives the node the kernel's mode (0666 for
    # the VFIO container) when the module comes. No udev here: without the static nodes,
    # devtmpfs creates them with the kernel's mode, which is what a host ends up with.
    kmod-static-nodes.service
    # modules nothing here uses; each costs a modprobe over 9p at boot
    modprobe@dm_mod.service
    modprobe@loop.service
    modprobe@efi_pstore.service
    modprobe@fuse.service
)

power_off() {
    sync
    echo o > /proc/sysrq-trigger   # stage 2 is PID 1 and no init system runs yet
    while :; do sleep 1; done
}

setup_failed() {
    echo "guest-systemd: $*"
    [[ -n "${OUT:-}" ]] && mountpoint -q "$OUT" && echo "$*" > "$OUT/setup-error"
    power_off
}

write_unit() {  # write_unit NAME < text
    cat > "/etc/systemd/system/$1" || setup_failed "cannot write /etc/systemd/system/$1"
}

stage2() {
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    OUT=
    for word in $(< /proc/cmdline); do
        case "$word" in ixydvm_out=*) OUT="${word#ixydvm_out=}" ;; esac
    done
    [[ -n "$OUT" ]] || setup_failed "no ixydvm_out= on the kernel command line"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out "$OUT" \
        || setup_failed "cannot mount the out share on $OUT"
    # shellcheck source=/dev/null  # written by harness.py for each run
    source "$OUT/config" || setup_failed "cannot read $OUT/config"
    touch /.ixydvm-writable 2> /dev/null || setup_failed "/ is not writable: no overlay root"
    rm -f /.ixydvm-writable

    # A /.dockerenv on the host's root would make systemd believe it runs in a container
    # (and ignore the systemd.* kernel arguments, skip device handling ...).
    rm -f /.dockerenv /run/.containerenv
    # The guest kernel's modules where modprobe, kmod-static-nodes and systemd-modules-load
    # look for them: `modprobe vfio-pci` in a unit then works as on a normal host.
    local kver
    kver=$(uname -r)
    if [[ ! -e /usr/lib/modules/$kver ]]; then
        mkdir -p /usr/lib/modules
        ln -s "$KROOT/lib/modules/$kver" "/usr/lib/modules/$kver" \
            || setup_failed "cannot link the guest kernel's modules"
    fi

    mkdir -p /etc/systemd/system
    for unit in "${MASKED_UNITS[@]}"; do
        ln -sfn /dev/null "/etc/systemd/system/$unit"
    done
    write_unit ixyd-vm.target << EOF
[Unit]
Description=ixyd test guest: the basic system and the test command
Requires=basic.target
After=basic.target
Wants=ixyd-vm-command.service
AllowIsolate=yes
EOF
    # The boot is finished (`systemctl is-system-running`: running, not starting) only when
    # no job is left: so Type=exec, whose start job ends once the command runs, and
    # DefaultDependencies=no, else the target would wait for this unit. The unit ends when
    # the command does; poweroff-force then stops what runs (ixyd included) without
    # waiting for orderly stop jobs: the results are on the share by then.
    write_unit ixyd-vm-command.service << EOF
[Unit]
Description=ixyd test guest: the command from the host
DefaultDependencies=no
Requires=sysinit.target
After=sysinit.target basic.target
Conflicts=shutdown.target
Before=shutdown.target
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=exec
ExecStart=/bin/bash $SELF run $OUT
StandardOutput=journal+console
StandardError=inherit
LimitMEMLOCK=infinity
EOF
    umount /sys /proc
    # No generators: each is a program read over 9p, and none of what they generate (fstab
    # mounts, gettys, SysV init scripts of the host, ...) has a use here.
    mkdir -p /run/ixydvm-no-generators
    exec env SYSTEMD_GENERATOR_PATH=/run/ixydvm-no-generators \
        SYSTEMD_ENVIRONMENT_GENERATOR_PATH=/run/ixydvm-no-generators \
        /lib/systemd/systemd --unit=ixyd-vm.target
}

# `guest_systemd.sh run OUT`: the command unit's main process.
run_command() {
    OUT=$1
    # shellcheck source=/dev/null
    source "$OUT/config" || { echo "cannot read $OUT/config" > "$OUT/setup-error"; exit 1; }
    # shellcheck disable=SC2086  # MODULES is a list
    if ! modprobe -a $MODULES 2> /run/modprobe.err; then
        echo "modprobe -a $MODULES: $(< /run/modprobe.err)" > "$OUT/setup-error"
        exit 1
    fi
    cd "$WORKDIR" || { echo "cannot cd to $WORKDIR" > "$OUT/setup-error"; exit 1; }
    read -r uptime _ < /proc/uptime   # as in guest_init.sh: after the modules
    echo "$uptime" > "$OUT/boot"
    budget=$(awk -v d="$DEADLINE" -v u="$uptime" \
        'BEGIN { b = d - u; printf "%.1f", (b < 1 ? 1 : b) }')
    started=$(date +%s.%N)
    timeout -k 2 "$budget" env -i "${GUEST_ENV[@]}" bash "$OUT/command.sh" \
        > "$OUT/output" 2>&1 < /dev/null
    rc=$?
    ended=$(date +%s.%N)
    if ((rc == 124 || rc == 137)) \
        && awk -v s="$started" -v e="$ended" -v b="$budget" 'BEGIN { exit !(e - s >= b) }'; then
        echo "command stopped after ${budget} s" > "$OUT/timedout"
    fi
    dmesg > "$OUT/dmesg" 2>&1
    journalctl -b --no-pager -o short-monotonic > "$OUT/journal" 2>&1
    echo "$rc" > "$OUT/rc"
    sync
    exit 0
}

case "${1:-}" in
    run) run_command "$2" ;;
    "") stage2 ;;
    *) echo "usage: $0 [run OUT]" >&2; exit 2 ;;
esac
