"""The VM fault lab: boot Debian's own kernel under qemu with a tiny initramfs and the host's
root shared read-only (tmpfs overlay on top), and run the kernel-fault scenario table inside.

Modules:
  vm         host side: kernel download/unpack, initramfs, accelerator probe, boot and run
  runner     the scenario runner (runs inside the VM, or directly on a disposable machine)
  dmtools    loop devices and device-mapper tables (dm-flakey, dm-delay, linear+error,
             dm-log-writes) for the runner
  logwrites  reader and replayer of dm-log-writes logs (power-cut replay)

Only the standard library is used on the host side; the runner imports blockspace.
"""
