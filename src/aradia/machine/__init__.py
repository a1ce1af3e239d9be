"""Machine layer: QEMU control (QMP, run state, vCPU registers, GDB stub) and page-table walks."""
