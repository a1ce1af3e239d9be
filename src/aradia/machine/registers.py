"""Parse vCPU registers from HMP ``info registers`` (x86).

The text lists ``NAME=hex`` pairs; segment and table registers (``FS =sel base limit flags``,
``GDT=     base limit``) carry their base as the second field.
"""

from __future__ import annotations

import re

_CPU = re.compile(r"^CPU#(\d+)", re.M)
_PAIR = re.compile(r"\b([A-Z][A-Z0-9]*) ?=([0-9a-fA-F]+)\b")
_SEG = re.compile(r"^(ES|CS|SS|DS|FS|GS|LDT|TR)\s*=\s*([0-9a-fA-F]+)\s+([0-9a-fA-F]+)\s+([0-9a-fA-F]+)", re.M)
_TABLE = re.compile(r"^(GDT|IDT)\s*=\s*([0-9a-fA-F]+)\s+([0-9a-fA-F]+)", re.M)
_SKIP = re.compile(r"^(FPR|XMM|YMM|ZMM|ST|FCW|FSW|FTW|MXCSR|DR)\d*")
_ALIAS32 = {"EAX": "rax", "EBX": "rbx", "ECX": "rcx", "EDX": "rdx", "ESI": "rsi", "EDI": "rdi",
            "EBP": "rbp", "ESP": "rsp", "EIP": "rip", "EFL": "rflags", "RFL": "rflags"}


def cpu_sections(text: str) -> list[tuple[int, str]]:
    """HMP ``info registers`` text split per vCPU: (index, its lines); one section 0 without marks."""
    marks = list(_CPU.finditer(text))
    return [(int(m[1]), text[m.end(): marks[i + 1].start() if i + 1 < len(marks) else len(text)])
            for i, m in enumerate(marks)] or [(0, text)]


def parse_info_registers(text: str) -> dict[int, dict[str, int]]:
    """Map CPU index to its registers (lower-case names: rip, rsp, cr3, efer, fs_base, gdt_base...)."""
    out: dict[int, dict[str, int]] = {}
    for idx, chunk in cpu_sections(text):
        regs: dict[str, int] = {}
        for line in chunk.splitlines():
            line = line.strip()
            if not line or _SKIP.match(line):
                continue
            if m := _SEG.match(line):
                name = m[1].lower()
                regs[name] = int(m[2], 16)
                regs[f"{name}_base"] = int(m[3], 16)
                continue
            if m := _TABLE.match(line):
                regs[f"{m[1].lower()}_base"] = int(m[2], 16)
                regs[f"{m[1].lower()}_limit"] = int(m[3], 16)
                continue
            for name, val in _PAIR.findall(line):
                regs[_ALIAS32.get(name, name.lower())] = int(val, 16)
        if regs:
            out[idx] = regs
    return out
