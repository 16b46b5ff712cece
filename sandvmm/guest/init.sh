#!/bin/busybox sh
# The default guest's init (PID 1), from sandvmm's initramfs.
#
# Protocol with the VMM (docs/lab.md, "The default guest"):
#   in:  the kernel command line parameter sandvmm.cmd=<base64 of a shell command line>;
#        without it, an interactive shell on the console.
#   out: one byte to I/O port 0xf5 as init's first act (the VMM's boot timer); the line
#        "sandvmm-init: ready" on the console once init is running; the command's exit
#        status as one byte written to I/O port 0xf4 (QEMU's isa-debug-exit device
#        understands the same write); then power off.
# /dev/port and /dev/console come from the initramfs itself, before devtmpfs is mounted.
/bin/busybox printf '\001' | /bin/busybox dd of=/dev/port bs=1 seek=245 count=1 2>/dev/null
/bin/busybox --install -s
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=linux
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
hostname sandvmm
while read -r module; do
    insmod "/lib/modules/$module.ko" 2>/dev/null || echo "sandvmm-init: cannot load $module" >&2
done < /etc/sandvmm-modules

command=
for word in $(cat /proc/cmdline); do
    case "$word" in
        sandvmm.cmd=*) command=$(echo "${word#sandvmm.cmd=}" | base64 -d) ;;
    esac
done

echo "sandvmm-init: ready"
if [ -n "$command" ]; then
    sh -c "$command"
    status=$?
else
    setsid cttyhack sh
    status=$?
fi
echo "sandvmm-init: exit $status"
sync
printf "\\$(printf %o "$status")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
poweroff -f
