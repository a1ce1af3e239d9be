"""Active tracing: events from a running guest.

Two mechanisms, chosen per probe: the GDB stub (breakpoints that stop the VM, read registers and
memory; for probes that need arguments) and the TCG plugin fast path (:mod:`aradia.trace.plugin`:
a QEMU plugin that counts and logs executions of target addresses inside QEMU, with no VM stop;
for call counts, coverage and "did X run").
"""
