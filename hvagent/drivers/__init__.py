"""Drivers: the only code that talks to QEMU (process and QMP), qemu-img and the kernel's
network stack. Services state intentions; drivers turn them into commands."""
