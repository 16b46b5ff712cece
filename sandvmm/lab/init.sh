#!/bin/busybox sh
# Stage one of the lab (docs/lab.md). Loads KVM and 9p, builds the job's root from the
# host's root, then switch_roots into it and runs the job script `sandvmm lab` wrote.
/bin/busybox --install -s
fail() { echo "sandvmm-lab: $*"; poweroff -f; }
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r module; do
    insmod "/lib/modules/$module.ko" || fail "cannot load $module"
done < /etc/sandvmm-modules
# Let shared memory use huge pages when asked (madvise): sandvmm's guest RAM is a memfd,
# and under nested KVM each 4 KiB first touch is an expensive fault (docs/lab.md). QEMU's
# anonymous guest RAM gets huge pages from the default `enabled` setting already.
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled || fail "cannot set shmem_enabled"

# The host's root is shared read-only; an overlay with a tmpfs on top makes it look
# writable to the job (so /tmp, caches and the like work) and throws those writes away
# at the end. Only the job share and the --rw shares write through to the host.
ninep="trans=virtio,version=9p2000.L,msize=1048576"
mkdir -p /host /scratch /newroot
mount -t 9p -o "$ninep,cache=loose,ro" host /host || fail "cannot mount the host's root"
mount -t tmpfs -o mode=0755 tmpfs /scratch
mkdir -p /scratch/upper /scratch/work
mount -t overlay -o lowerdir=/host,upperdir=/scratch/upper,workdir=/scratch/work overlay /newroot \
    || fail "cannot put an overlay on the host's root"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm /newroot/dev/virtio-ports
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/run
lab=/newroot/run/sandvmm-lab
mkdir -p "$lab/job"
mount -t 9p -o "$ninep" job "$lab/job" || fail "cannot mount the job share"
while read -r tag path; do
    mkdir -p "/newroot$path"
    mount -t 9p -o "$ninep" "$tag" "/newroot$path" || fail "cannot mount $path read-write"
done < "$lab/job/mounts"
# Name the output ports the way udev would, so the job script needs no lookup.
for port in /sys/class/virtio-ports/*; do
    ln -s "/dev/${port##*/}" "/newroot/dev/virtio-ports/$(cat "$port/name")"
done
cp /bin/busybox "$lab/busybox"
exec switch_root /newroot /run/sandvmm-lab/busybox sh /run/sandvmm-lab/job/job.sh
