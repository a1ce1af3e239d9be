"""BTF from kernel files (vmlinuz / vmlinux / compressed / raw) and module BTF from guest RAM.

Unit tests build small kernels by hand: an ELF64 with a ``.BTF`` and a ``.notes`` section, compressed
with each kernel compressor (with the size trailer the kernel build appends) and wrapped in a bzImage
setup header. Guest tests take Debian's real vmlinuz files (LZ4 for 5.10 and 6.1, zstd for 6.12) and
compare their BTF with what aradia reads from the running guest's RAM, and compare each module's BTF
in RAM with the ``.BTF`` of its ``.ko`` file.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lz4.block
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aradia.errors import AradiaError, UnsupportedKernel
from aradia.lab.images import build_guest
from aradia.lab.launcher import Guest
from aradia.linux import vmlinux
from aradia.linux.btf import INT, STRUCT, Btf
from aradia.linux.kernel import Kernel
from aradia.linux.module_btf import module_btfs
from aradia.linux.profile import find_profile
from aradia.linux.vmlinux import KernelFileError, btf_from_bytes, elf_sections, read_btf
from aradia.vm import attach
from guest_truth import proc_modules

BUILD_ID = bytes(range(20))

# --- crafted kernels ---------------------------------------------------------------------------------


def make_btf(name: str = "int") -> bytes:
    """A valid BTF blob with one 4-byte signed INT type called ``name``."""
    strings = b"\0" + name.encode() + b"\0"
    types = struct.pack("<III", 1, INT << 24, 4) + struct.pack("<I", (1 << 24) | 32)
    return struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings)) + types + strings


def make_notes(build_id: bytes) -> bytes:
    """An ELF notes blob: an unrelated note, then the GNU build ID."""
    other = struct.pack("<III", 6, 4, 1) + b"Linux\0\0\0" + b"\1\2\3\4"
    return other + struct.pack("<III", 4, len(build_id), 3) + b"GNU\0" + build_id


def make_elf(sections: dict[str, bytes], pad: int = 0) -> bytes:
    """A little-endian ELF64 with ``sections`` (plus the null section and .shstrtab), ``pad`` zero
    bytes after the header (to make big files)."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [*sections, ".shstrtab"])
    body = bytearray(bytes(64 + pad))
    headers = [struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    for name, data in [*sections.items(), (".shstrtab", names)]:
        while len(body) % 8:
            body.append(0)
        headers.append(struct.pack("<IIQQQQIIQQ", names.index(name.encode() + b"\0"), 1, 0, 0, len(body),
                                   len(data), 0, 0, 1, 0))
        body += data
    while len(body) % 8:
        body.append(0)
    shoff = len(body)
    body += b"".join(headers)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    body[:64] = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 0, shoff, 0, 64, 56, 0, 64, len(headers),
                                    len(headers) - 1)
    return bytes(body)


def make_vmlinux(btf: bytes | None = None, pad: int = 0) -> bytes:
    return make_elf({".text": b"\x90" * 64, ".notes": make_notes(BUILD_ID), ".BTF": btf or make_btf()}, pad)


def lz4_legacy(data: bytes, *, split: bool = False) -> bytes:
    """``lz4 -l``: the magic, then blocks of at most 8 MiB (``split``: a second stream, magic again)."""
    out = bytearray(vmlinux.LZ4_LEGACY_MAGIC)
    for i in range(0, len(data), vmlinux.LZ4_LEGACY_BLOCK):
        if split and i:
            out += vmlinux.LZ4_LEGACY_MAGIC
        block = lz4.block.compress(data[i:i + vmlinux.LZ4_LEGACY_BLOCK], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return bytes(out)


def with_size(compress: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """The kernel build's ``size_append``: the uncompressed size as a little-endian u32 after the stream."""
    return lambda data: compress(data) + struct.pack("<I", len(data) & 0xFFFFFFFF)


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda d: gzip.compress(d, mtime=0),
    "xz": with_size(lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)),
    "lzma": with_size(lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE)),
    "bzip2": with_size(bz2.compress),
    "lz4": with_size(lz4_legacy),
    "zstd": with_size(lambda d: zstandard.ZstdCompressor(level=19).compress(d)),
}


def make_bzimage(payload: bytes, *, version: int = 0x20F, setup_sects: int = 1, offset: int = 0x123,
                 length: int | None = None) -> bytes:
    """A bzImage shell: boot sector and setup (``setup_sects`` sectors), then the payload at
    ``payload_offset`` into the protected-mode part, followed by some trailing code."""
    head = bytearray(((setup_sects or 4) + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, version)
    struct.pack_into("<II", head, 0x248, offset, len(payload) if length is None else length)
    return bytes(head) + b"\xcc" * offset + payload + b"\xc3" * 100


# --- unit tests: formats ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_each_compressor_in_a_bzimage(name: str, tmp_path: Path) -> None:
    btf = make_btf("u32_" + name)
    kernel = make_vmlinux(btf)
    f = tmp_path / "vmlinuz"
    f.write_bytes(make_bzimage(COMPRESSORS[name](kernel)))
    got = read_btf(f)
    assert (got.blob, got.build_id, got.format) == (btf, BUILD_ID.hex(), f"bzImage/{name}")
    assert Btf(got.blob).type(1).name == "u32_" + name
    # The same stream on its own (a vmlinux.gz, vmlinux.xz, ...) and with setup_sects 0 (meaning 4).
    bare = btf_from_bytes(COMPRESSORS[name](kernel))
    assert (bare.blob, bare.format) == (btf, name)
    assert btf_from_bytes(make_bzimage(COMPRESSORS[name](kernel), setup_sects=0)).blob == btf


@pytest.mark.timeout(60)
def test_raw_elf_and_raw_blob(tmp_path: Path) -> None:
    btf = make_btf()
    (tmp_path / "vmlinux").write_bytes(make_vmlinux(btf))
    (tmp_path / "vmlinux.btf").write_bytes(btf)
    elf = read_btf(tmp_path / "vmlinux")
    assert (elf.blob, elf.build_id, elf.format) == (btf, BUILD_ID.hex(), "elf")
    raw = read_btf(tmp_path / "vmlinux.btf")
    assert (raw.blob, raw.build_id, raw.format) == (btf, None, "btf")
    no_notes = make_elf({".BTF": btf})
    assert btf_from_bytes(no_notes).build_id is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("split", [False, True])
def test_lz4_legacy_many_blocks(split: bool) -> None:
    """A kernel larger than one 8 MiB LZ4 legacy block (and a stream restarted with the magic)."""
    kernel = make_vmlinux(pad=(17 << 20) + 12345)
    payload = with_size(lambda d: lz4_legacy(d, split=split))(kernel)
    assert payload.count(vmlinux.LZ4_LEGACY_MAGIC) == (3 if split else 1)
    assert vmlinux.lz4_legacy(payload) == kernel
    assert btf_from_bytes(make_bzimage(payload)).blob == make_btf()


BAD_INPUTS: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", "not a bzImage"),
    "garbage": (lambda: b"MZ" + bytes(1000), "not a bzImage"),
    "lzo": (lambda: make_bzimage(b"\x89LZO\0" + bytes(100)), "LZO kernels are not supported"),
    "old protocol": (lambda: make_bzimage(COMPRESSORS["gzip"](make_vmlinux()), version=0x206), "predates"),
    "payload past the end": (lambda: make_bzimage(b"\x1f\x8b" + bytes(10), length=1 << 30), "outside"),
    "empty payload": (lambda: make_bzimage(b"", length=0), "outside"),
    "truncated xz": (lambda: make_bzimage(COMPRESSORS["xz"](make_vmlinux())[:60]), "xz"),
    "truncated gzip": (lambda: make_bzimage(COMPRESSORS["gzip"](make_vmlinux())[:40]), "gzip"),
    "truncated zstd": (lambda: make_bzimage(COMPRESSORS["zstd"](make_vmlinux())[:30]), "zstd"),
    "corrupt bzip2": (lambda: make_bzimage(b"BZh9" + bytes(64)), "bzip2"),
    "corrupt lz4": (lambda: make_bzimage(vmlinux.LZ4_LEGACY_MAGIC + struct.pack("<I", 8) + b"\xff" * 8 + bytes(4)),
                    "LZ4 block"),
    "empty lz4": (lambda: make_bzimage(vmlinux.LZ4_LEGACY_MAGIC + struct.pack("<I", 1 << 30)), "empty LZ4"),
    "payload not ELF": (lambda: make_bzimage(COMPRESSORS["zstd"](b"hello kernel")), "not an ELF"),
    "no .BTF": (lambda: make_bzimage(COMPRESSORS["gzip"](make_elf({".text": b"\x90"}))), "no .BTF section"),
    ".BTF not BTF": (lambda: make_elf({".BTF": b"nope" * 8}), "BTF magic"),
    "section past the end": (lambda: make_vmlinux()[:-200], "outside the file"),
    "big-endian ELF": (lambda: b"\x7fELF\x02\x02" + bytes(100), "little-endian"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_kernel_files_are_clear_errors(case: str, tmp_path: Path) -> None:
    make, needle = BAD_INPUTS[case]
    f = tmp_path / "vmlinuz"
    f.write_bytes(make())
    with pytest.raises(KernelFileError) as e:
        read_btf(f)
    assert isinstance(e.value, AradiaError)
    assert needle in str(e.value) and str(f) in str(e.value), str(e.value)


@pytest.mark.timeout(60)
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KernelFileError, match="cannot read kernel file"):
        read_btf(tmp_path / "nothing")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_decompression_is_bounded(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A payload that decompresses past the cap is refused, not held in memory."""
    monkeypatch.setattr(vmlinux, "MAX_VMLINUX", 1 << 20)
    bomb = make_bzimage(COMPRESSORS[name](make_vmlinux(pad=3 << 20)))
    with pytest.raises(KernelFileError, match="larger than 1048576 bytes"):
        btf_from_bytes(bomb)


_SAMPLE = {name: make_bzimage(c(make_vmlinux())) for name, c in COMPRESSORS.items()}


@pytest.mark.timeout(300)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(_SAMPLE)), edits=st.lists(
    st.tuples(st.integers(min_value=0, max_value=1 << 16), st.binary(min_size=1, max_size=8)), max_size=6),
    cut=st.integers(min_value=0, max_value=1 << 16))
def test_corrupted_kernel_files_never_crash(name: str, edits: list[tuple[int, bytes]], cut: int) -> None:
    """Bytes overwritten anywhere (header, payload, ELF) and any truncation: a result or a KernelFileError."""
    data = bytearray(_SAMPLE[name])
    for at, chunk in edits:
        at %= len(data)
        data[at:at + len(chunk)] = chunk
    data = data[:len(data) - cut % len(data)] if cut % 3 == 0 else data
    try:
        got = btf_from_bytes(bytes(data))
    except KernelFileError:
        return
    assert got.blob[:2] == vmlinux.BTF_MAGIC


# --- real Debian kernels and guests ----------------------------------------------------------------------

SERIES = ("5.10", "6.1", "6.12")


def _ko_btf(path: Path) -> bytes | None:
    """The .BTF section of a module file (.ko or .ko.xz/.ko.zst), or None if it has none."""
    raw = path.read_bytes()
    if path.suffix == ".xz":
        raw = lzma.decompress(raw)
    elif path.suffix == ".zst":
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    sections = elf_sections(raw)
    if ".BTF" not in sections:
        return None
    off, size = sections[".BTF"]
    return raw[off:off + size]


@pytest.mark.guest
@pytest.mark.timeout(300)
@pytest.mark.parametrize("series", SERIES)
def test_vmlinuz_btf_equals_btf_in_ram(series: str, boot_guest: Callable[..., Any], tmp_path: Path) -> None:
    image = build_guest(series)
    started = time.perf_counter()
    from_file = read_btf(image.vmlinuz)
    seconds = time.perf_counter() - started
    assert from_file.format == ("bzImage/zstd" if series == "6.12" else "bzImage/lz4")
    with boot_guest(series, shared_memory=True) as guest:
        vm = attach(f"qmp:{guest.qmp_path}")
        try:
            profile = find_profile(vm, cache=False)
            assert profile.btf is not None
            assert from_file.blob == profile.btf.data  # byte for byte
            assert from_file.build_id == profile.build_id
            via_file = find_profile(vm, cache=False, btf_source=image.vmlinuz)
            assert via_file.btf is not None and via_file.btf.digest == profile.btf.digest
            kernel = Kernel(vm, btf_source=image.vmlinuz)
            assert kernel.prog.type("struct task_struct").size == profile.btf.type(
                profile.btf.find("task_struct", (STRUCT,))[0]).size
            assert any(p.pid == 1 for p in kernel.processes())
            other = build_guest("6.12" if series != "6.12" else "6.1").vmlinuz
            with pytest.raises(UnsupportedKernel, match="kernel build"):
                find_profile(vm, cache=False, btf_source=other)
            _check_module_btf(guest, kernel, series)
        finally:
            vm.close()
    print(f"\n{series}: BTF from {image.vmlinuz.name} ({from_file.format}, {len(from_file.blob)} bytes) "
          f"in {seconds:.3f} s")


def _check_module_btf(guest: Guest, kernel: Kernel, series: str) -> None:
    """Each loaded module's BTF in RAM equals the .BTF of its file; a module type resolves."""
    base = kernel.profile.btf
    assert base is not None
    mods = module_btfs(kernel.prog, base, kernel.warnings)
    assert kernel.warnings == []
    loaded = {name for name, _, _ in proc_modules(guest)}
    if series == "5.10":
        assert mods == []  # module BTF arrived in 5.11
        return
    assert {m.name for m in mods} == loaded
    files = {p.name.split(".ko")[0].replace("-", "_"): p for p in guest.image.modules_dir.rglob("*.ko*")}
    for m in mods:
        assert m.btf.first_id == base.count + 1
        assert m.btf.data == _ko_btf(files[m.name]), m.name
    virtio_net = next(m for m in mods if m.name == "virtio_net")
    tid = virtio_net.btf.find("virtnet_info", (STRUCT,))[0]
    assert tid > base.count
    info = virtio_net.btf.type(tid)
    members = {mem.name: mem for mem in info.members}
    # Members reach back into the kernel's types: vdev is a struct virtio_device * from virtio's BTF
    # or the kernel's, dev a struct net_device * from the kernel's.
    dev = virtio_net.btf.type(virtio_net.btf.type(members["dev"].type).type)
    assert (dev.name, dev.kind) == ("net_device", STRUCT) and dev.id <= base.count
