"""Active tracing: events from a running guest.

Two mechanisms, chosen per probe: the GDB stub (breakpoints that stop the VM, read registers and
memory; for probes that need arguments) and the TCG plugin fast path (a QEMU plugin that counts and
logs executions of target addresses inside QEMU, with no VM stop; for call counts, coverage and "did X
run"): :mod:`aradia.trace.pluginload` loads it into a QEMU and finds it there,
:mod:`aradia.trace.pluginshm` is the shared file aradia and the plugin talk through. Where QEMU's
plugin API reads registers and memory (>= 9.2), syscall tracing runs in the plugin too
(:mod:`aradia.trace.plugintrace`: filtered and captured inside QEMU, decoded into the same events).
"""
