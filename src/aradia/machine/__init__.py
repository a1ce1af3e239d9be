"""Machine layer: QEMU control, vCPUs, page-table walks and guest images."""
