"""arm64 page walks on page tables built byte by byte in RAM at virt's 0x40000000, and the arch seam.

Every expected address below is worked out by hand from the descriptors the test writes.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from aradia.errors import AradiaError, GuestDataCorrupt, PageFault, UnsupportedKernel
from aradia.machine.arch import ARM64, X86, Arm64, architecture, from_elf_machine, from_qemu_target
from aradia.machine.handle import cpu_state
from aradia.machine.paging import PageMapping, Translator, mappings, read_virt, translate, write_virt
from bytes_memory import BytesMemory

pytestmark = pytest.mark.timeout(60)

DATA = Path(__file__).parent / "data"
RAM = 0x4000_0000
VALID, TABLE, PAGE_DESC = 0b01, 0b11, 0b11  # block: 0b01; table (L0-L2) and page (L3): 0b11
AF = 1 << 10
AP_EL0, AP_RO = 1 << 6, 1 << 7
PXN, UXN, CONT = 1 << 53, 1 << 54, 1 << 52
UXN_TABLE, AP_TABLE_NO_EL0, AP_TABLE_RO = 1 << 60, 1 << 61, 1 << 62

# Table pages of the synthetic layout (all in the first MiB of RAM).
L0, L1, L2, L3 = RAM + 0x1000, RAM + 0x2000, RAM + 0x3000, RAM + 0x4000
L0_USER, L1_USER, L2_USER, L3_USER = RAM + 0x8000, RAM + 0x5000, RAM + 0x6000, RAM + 0x7000
KVA = 0xFFFF_8000_0000_0000  # the TTBR1 half of a 48-bit VA starts here: L0 index 256


def put(mem: BytesMemory, table: int, index: int, value: int) -> None:
    mem.write(table + 8 * index, struct.pack("<Q", value))


@pytest.fixture
def mem() -> BytesMemory:
    """64 MiB of RAM at 0x40000000 with a 48-bit layout, kernel tables under root L0 (a TTBR1), user
    tables under L0_USER (a TTBR0):

    * KVA + 0x4000_3000 (L0[256] -> L1[1] -> L2[0] -> L3[3]): 4 KiB page at 0x4080_0000, kernel RW, PXN clear
    * KVA + 0x4000_4000 (L3[4]): 4 KiB page at 0x4080_1000, read-only, PXN and the contiguous hint
    * KVA + 0x4000_5000 (L3[5]): invalid
    * KVA + 0x4000_6000 (L3[6]): 0b01, a reserved encoding at L3
    * KVA + 0x4020_0000 (L2[1]): 2 MiB block at 0x4120_0000
    * KVA + 0x8000_0000 (L1[2]): 1 GiB block at 0x4000_0000 (all of RAM and beyond)
    * KVA + 0xC000_0000 (L1[3]): table at 0x7000_0000, outside RAM
    * USER_VA (L0_USER[0] -> L1_USER[1], UXNTable -> L2_USER[0] -> L3_USER[0]): user page at
      0x4080_2000, EL0 read/write; USER_VA + 2 MiB (L2_USER[1], APTable no-EL0 and read-only, to the
      same L3 table): the same page, seen as a read-only kernel page
    """
    m = BytesMemory({RAM: bytearray(64 << 20)})
    put(m, L0, 256, L1 | TABLE)
    put(m, L1, 1, L2 | TABLE)
    put(m, L2, 0, L3 | TABLE)
    put(m, L3, 3, 0x4080_0000 | PAGE_DESC | AF)
    put(m, L3, 4, 0x4080_1000 | PAGE_DESC | AF | AP_RO | PXN | CONT)
    put(m, L3, 6, 0x4080_3000 | VALID | AF)
    put(m, L2, 1, 0x4120_0000 | VALID | AF)
    put(m, L1, 2, 0x4000_0000 | VALID | AF | UXN)
    put(m, L1, 3, 0x7000_0000 | TABLE)
    put(m, L0_USER, 0, L1_USER | TABLE)
    put(m, L1_USER, 1, L2_USER | TABLE | UXN_TABLE)
    put(m, L2_USER, 0, L3_USER | TABLE)
    put(m, L3_USER, 0, 0x4080_2000 | PAGE_DESC | AF | AP_EL0 | PXN)
    put(m, L2_USER, 1, (L3_USER + 0) | TABLE | AP_TABLE_NO_EL0 | AP_TABLE_RO)
    m.write(0x4080_0000, b"page-one")
    m.write(0x4080_1000, b"page-two")
    m.write(0x4080_2000, b"user-page")
    return m


USER_VA = 0x4000_0000  # L0[0], L1[1], L2[0], L3[0]


def test_4k_page_walk_exact(mem: BytesMemory) -> None:
    t = translate(mem, L0, KVA + 0x4000_3123, arch=ARM64)
    assert (t.paddr, t.page_size, t.writable, t.user, t.nx) == (0x4080_0123, 4096, True, False, False)


def test_read_only_pxn_and_contiguous_hint_ignored(mem: BytesMemory) -> None:
    t = translate(mem, L0, KVA + 0x4000_4008, arch=ARM64)
    assert (t.paddr, t.page_size, t.writable, t.user, t.nx) == (0x4080_1008, 4096, False, False, True)


def test_2m_block_at_level_2(mem: BytesMemory) -> None:
    t = translate(mem, L0, KVA + 0x4020_0000 + 0x1_2345, arch=ARM64)
    assert (t.paddr, t.page_size) == (0x4121_2345, 2 << 20)


def test_1g_block_at_level_1(mem: BytesMemory) -> None:
    t = translate(mem, L0, KVA + 0x8000_0000 + 0x0123_4567, arch=ARM64)
    # a kernel page: UXN does not make it non-executable for the kernel (PXN is clear)
    assert (t.paddr, t.page_size, t.writable, t.user, t.nx) == (0x4123_4567, 1 << 30, True, False, False)


def test_invalid_entry_names_the_level(mem: BytesMemory) -> None:
    with pytest.raises(PageFault, match=r"L3 entry 5 of table 0x40004000"):
        translate(mem, L0, KVA + 0x4000_5000, arch=ARM64)
    with pytest.raises(PageFault, match=r"L1 entry 0 of table 0x40002000"):
        translate(mem, L0, KVA + 0x10, arch=ARM64)


def test_reserved_encodings_fault(mem: BytesMemory) -> None:
    with pytest.raises(PageFault, match=r"L3 entry 6 .*reserved encoding"):
        translate(mem, L0, KVA + 0x4000_6000, arch=ARM64)
    put(mem, L0, 300, 0x4000_0000 | VALID | AF)  # a block descriptor at L0 does not exist with 4 KiB
    with pytest.raises(PageFault, match=r"L0 entry 300 .*reserved encoding"):
        translate(mem, L0, 0xFFFF_0000_0000_0000 | (300 << 39), arch=ARM64)


def test_table_outside_ram_faults(mem: BytesMemory) -> None:
    with pytest.raises(PageFault, match=r"L2 table 0x70000000: not RAM"):
        translate(mem, L0, KVA + 0xC000_0000, arch=ARM64)


def test_non_canonical_addresses_fault(mem: BytesMemory) -> None:
    for bad in (0x0001_0000_0000_0000, 0xFFFE_FFFF_FFFF_F000, 1 << 64):
        with pytest.raises(PageFault, match="non-canonical"):
            translate(mem, L0, bad, arch=ARM64)
    assert translate(mem, L0, (KVA + 0x4000_3000) - (1 << 64), arch=ARM64).paddr == 0x4080_0000


def test_ttbr_asid_and_cnp_are_masked(mem: BytesMemory) -> None:
    ttbr = (0x58 << 48) | L0 | 1  # ASID 0x58, CnP, as QEMU showed a guest's TTBR1_EL1
    assert translate(mem, ttbr, KVA + 0x4000_3000, arch=ARM64).paddr == 0x4080_0000
    tr = Translator(mem, lambda: 0, arch=ARM64)
    assert tr.read(ttbr, KVA + 0x4000_3000, 8) == b"page-one"


def test_user_page_and_table_permissions(mem: BytesMemory) -> None:
    t = translate(mem, L0_USER, USER_VA + 0x10, arch=ARM64)
    # EL0 read/write; UXNTable on the L1 entry makes it non-executable for EL0
    assert (t.paddr, t.writable, t.user, t.nx) == (0x4080_2010, True, True, True)
    # the same L3 table reached through an L2 entry with APTable no-EL0 and read-only
    t2 = translate(mem, L0_USER, USER_VA + (2 << 20), arch=ARM64)
    assert (t2.paddr, t2.writable, t2.user, t2.nx) == (0x4080_2000, False, False, True)


def test_39_bit_va_walks_three_levels() -> None:
    mem = BytesMemory({RAM: bytearray(4 << 20)})
    arch = Arm64(39)
    root, l2, l3 = RAM + 0x1000, RAM + 0x2000, RAM + 0x3000
    va = 0xFFFF_FF80_0000_0000 + (5 << 30) + (7 << 21) + (9 << 12) + 0x44  # L1[5] L2[7] L3[9]
    put(mem, root, 5, l2 | TABLE)
    put(mem, l2, 7, l3 | TABLE)
    put(mem, l3, 9, 0x4030_0000 | PAGE_DESC | AF)
    assert translate(mem, root, va, arch=arch).paddr == 0x4030_0044
    with pytest.raises(PageFault, match="non-canonical"):
        translate(mem, root, KVA, arch=arch)  # a 48-bit kernel address is not canonical with 39 bits
    with pytest.raises(UnsupportedKernel):
        Arm64(52)


def test_read_and_write_across_pages(mem: BytesMemory) -> None:
    va = KVA + 0x4000_3FFC  # the last 4 bytes of page one, then page two
    assert read_virt(mem, L0, va, 12, arch=ARM64) == b"\0" * 4 + b"page-two"
    write_virt(mem, L0, va, b"ABCDEFGH", arch=ARM64)
    assert mem.read(0x4080_0FFC, 4) == b"ABCD" and mem.read(0x4080_1000, 4) == b"EFGH"
    with pytest.raises(PageFault):
        write_virt(mem, L0, KVA + 0x4000_4FFC, b"12345678", arch=ARM64)  # page 5 is invalid
    assert mem.read(0x4080_1FFC, 4) == b"\0" * 4  # nothing written


def test_la57_is_refused() -> None:
    mem = BytesMemory({RAM: bytearray(1 << 20)})
    with pytest.raises(AradiaError, match="la57"):
        translate(mem, RAM, KVA, la57=True, arch=ARM64)


def test_mappings_of_the_kernel_half(mem: BytesMemory) -> None:
    got = list(mappings(mem, L0, start=KVA, end=KVA + (4 << 30), arch=ARM64))
    assert got == [
        PageMapping(KVA + 0x4000_3000, 0x4080_0000, 0x1000, True, False, False),
        PageMapping(KVA + 0x4000_4000, 0x4080_1000, 0x1000, False, False, True),
        PageMapping(KVA + 0x4020_0000, 0x4120_0000, 2 << 20, True, False, False),
        # the 1 GiB block is clipped to the 64 MiB of RAM; the table outside RAM maps nothing
        PageMapping(KVA + 0x8000_0000, 0x4000_0000, 64 << 20, True, False, False),
    ]


def test_mappings_of_the_user_half(mem: BytesMemory) -> None:
    got = list(mappings(mem, L0_USER, start=0, end=1 << 48, arch=ARM64))
    assert got == [
        PageMapping(USER_VA, 0x4080_2000, 0x1000, True, True, True),
        PageMapping(USER_VA + (2 << 20), 0x4080_2000, 0x1000, False, False, True),
    ]


def test_mappings_bounded_on_loops_and_shared_tables(mem: BytesMemory) -> None:
    put(mem, L2, 5, L1 | TABLE)  # back to a table on its own path: not followed
    assert len(list(mappings(mem, L0, start=KVA, end=KVA + (4 << 30), arch=ARM64))) == 4
    for i in range(2, 512):  # one L3 table shared by 510 L2 entries
        put(mem, L2, i, L3 | TABLE)
    with pytest.raises(GuestDataCorrupt, match="more than 100 table visits"):
        list(mappings(mem, L0, start=KVA, end=KVA + (4 << 30), arch=ARM64, max_tables=100))


def test_detection_from_qemu_and_elf() -> None:
    assert from_qemu_target("aarch64") is ARM64 and from_qemu_target("x86_64") is X86
    assert from_elf_machine(183) is ARM64 and from_elf_machine(62) is X86
    assert architecture("aarch64") is ARM64 and architecture("amd64") is X86
    with pytest.raises(UnsupportedKernel):
        from_qemu_target("riscv64")
    with pytest.raises(UnsupportedKernel):
        from_elf_machine(243)


def test_registers_from_qemu_7_2_info_registers() -> None:
    regs = ARM64.parse_info_registers((DATA / "registers-aarch64.txt").read_text())
    r = regs[0]
    assert r["pc"] == 0xFFFFC001A99890BC and r["sp"] == 0xFFFF80000824B6A0
    assert r["x1"] == 0xFFFF000002034000 and r["x30"] == 0x98ADC001A991D9FC and r["cpsr"] == 0x60400005
    assert len([k for k in r if k.startswith("x")]) == 31 and "p00" not in r and "ffr" not in r
    c = cpu_state(0, {**r, "ttbr1_el1": 0x58_0000_4158_F001}, ARM64)
    assert (c.pc, c.sp, c.cpl, c.cr3, c.la57, c.arch) == (r["pc"], r["sp"], 1, 0x58_0000_4158_F001, False, "arm64")


def test_tcr_check() -> None:
    tcr = 0x15001F5B5503510  # TCR_EL1 of the Debian 6.1 arm64 guest: T1SZ 16, TG1 4 KiB
    ARM64.check_tcr(tcr)
    with pytest.raises(UnsupportedKernel, match="48-bit"):
        Arm64(39).check_tcr(tcr)
    with pytest.raises(UnsupportedKernel, match="granule"):
        ARM64.check_tcr(tcr & ~(3 << 30) | (1 << 30))


def test_52_bit_va_with_lpa2_walks_five_levels() -> None:
    mem = BytesMemory({RAM: bytearray(4 << 20)})
    arch = Arm64(52, lpa2=True)
    lm1, l0, l1, l2, l3 = (RAM + 0x1000 * i for i in range(1, 6))
    va = 0xFFF0_0000_0000_0000 + (3 << 48) + (5 << 39) + (6 << 30) + (7 << 21) + (8 << 12) + 0x10
    put(mem, lm1, 3, l0 | TABLE)  # L-1 has 16 entries: VA bits 48-51
    put(mem, l0, 5, l1 | TABLE)
    put(mem, l1, 6, l2 | TABLE)
    put(mem, l2, 7, l3 | TABLE)
    put(mem, l3, 8, 0x4030_0000 | PAGE_DESC | AF)
    assert translate(mem, lm1, va, arch=arch).paddr == 0x4030_0010
    put(mem, l3, 9, 0x4030_0000 | (0b01 << 8) | PAGE_DESC | AF)  # descriptor bits 8-9: address bits 50-51
    assert translate(mem, lm1, va + 0x1000, arch=arch).paddr == (1 << 50) | 0x4030_0010
    put(mem, l0, 6, (1 << 39) | VALID | AF)  # a 512 GiB block at L0 exists with LPA2
    t = translate(mem, lm1, va + (1 << 39), arch=arch)
    assert (t.paddr, t.page_size) == ((1 << 39) + (6 << 30) + (7 << 21) + (8 << 12) + 0x10, 1 << 39)
    put(mem, lm1, 4, (1 << 48) | VALID | AF)  # no block at L-1
    with pytest.raises(PageFault, match=r"L-1 entry 4 .*reserved"):
        translate(mem, lm1, va + (1 << 48), arch=arch)
    # a TTBR carries address bits 48-51 in its bits 2-5
    assert arch.root_table((0x12 << 48) | 0x4000_1000 | (0b1010 << 2) | 1) == (0b1010 << 48) | 0x4000_1000
    assert list(mappings(mem, lm1, start=va & ~0xFFF, end=(va & ~0xFFF) + 0x2000, arch=arch)) == [
        PageMapping(va & ~0xFFF, 0x4030_0000, 0x1000, True, False, False)]  # (1 << 50) is not RAM


def test_arch_from_tcr() -> None:
    assert Arm64.from_tcr(0x15001F5B5503510) == Arm64(48)  # Debian 6.1 on -cpu max
    lpa2 = Arm64.from_tcr((0x15001F5B5503510 & ~(0x3F << 16)) | (12 << 16) | (1 << 59))
    assert (lpa2.va_bits, lpa2.lpa2, lpa2.levels) == (52, True, 5)
    assert ARM64.for_registers({}) is ARM64 and ARM64.for_registers({"tcr_el1": 0}) is ARM64
    with pytest.raises(UnsupportedKernel):
        Arm64(52)  # 52 bits need the LPA2 format with a 4 KiB granule
