"""``aradia keys aes`` against a real guest: a static guest program expands an AES-128, -192 and -256
key it generated (getrandom) and prints them; it also holds 256 MiB of random data. Ground truth is the
program's own output, and its own count of the bits that differ in its schedules after the test
flipped some (through ``vm.write``)."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from aradia.lab.images import build_guest
from aradia.lab.launcher import Guest, launch
from aradia.linux.maps import user_root
from aradia.vm import attach
from cli_runner import assert_one_line_error, run_cli
from guest_programs import build_aeskeys, install_program

pytestmark = [pytest.mark.guest, pytest.mark.timeout(900)]

NOISE = 256 << 20
SCHEDULE_BYTES = {128: 176, 192: 208, 256: 240}


@pytest.fixture(scope="module")
def g(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """A guest with 768 MiB (the program's 256 MiB of random data must fit) and ``/tmp/aeskeys``."""
    tmp = tmp_path_factory.mktemp("aes")
    with launch(build_guest("6.1"), memory="768M", shared_memory=True) as guest:
        install_program(guest, "aeskeys", build_aeskeys(tmp))
        yield guest


@pytest.fixture(scope="module")
def program(g: Guest) -> dict:
    """The running program: pid, keys by size, their schedules' addresses, where the noise is."""
    out = g.run(f"(/tmp/aeskeys {NOISE} > /tmp/aes.out &); for i in $(seq 600); do grep -q ready /tmp/aes.out "
                "&& break; sleep 0.1; done; cat /tmp/aes.out", timeout=120)
    keys = {int(b): (k, int(a, 16)) for b, k, a in re.findall(r"key (\d+) ([0-9a-f]+) at (0x[0-9a-f]+)", out)}
    assert sorted(keys) == [128, 192, 256], out
    pid = int(re.search(r"ready (\d+)", out).group(1))
    noise = re.search(r"noise (0x[0-9a-f]+) (\d+)", out)
    assert noise and int(noise.group(2)) == NOISE
    return {"pid": pid, "keys": keys}


def keys_aes(g: Guest, *args: str) -> dict:
    r = run_cli("keys", "aes", "--vm", f"qmp:{g.qmp_path}", *args, "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_all_three_found_in_process_no_false_positives_in_its_noise(g: Guest, program: dict) -> None:
    doc = keys_aes(g, "--pid", str(program["pid"]))
    # exactly the three: the process also holds 256 MiB of random data, where nothing may be found
    assert {(k["bits"], k["key"], k["address"]) for k in doc["keys"]} == \
        {(bits, key, addr) for bits, (key, addr) in program["keys"].items()}
    assert all(k["bit_errors"] == 0 and k["order"] == "bytes" for k in doc["keys"])
    assert doc["scanned"] >= NOISE
    assert doc["mb_per_s"] > 0


def test_all_three_found_in_all_ram(g: Guest, program: dict) -> None:
    doc = keys_aes(g)
    found = {(k["bits"], k["key"]) for k in doc["keys"]}
    # other genuine schedules may lie in RAM (e.g. the ssh session that installed the program)
    assert {(bits, key) for bits, (key, _a) in program["keys"].items()} <= found
    assert doc["scanned"] >= 760 << 20


def test_found_with_five_bits_flipped_in_each_schedule(g: Guest, program: dict) -> None:
    rng = random.Random(5)
    vm = attach(f"qmp:{g.qmp_path}")
    try:
        prog = vm.load_kernel().prog
        root = user_root(prog, program["pid"])
        la57 = vm.kernel_root()[1]
        for bits, (_key, addr) in program["keys"].items():
            for bit in rng.sample(range(SCHEDULE_BYTES[bits] * 8), 5):
                t = vm.translate(addr + bit // 8, cr3=root, la57=la57)
                byte = vm.read(t.paddr, 1)[0]
                vm.write(t.paddr, bytes([byte ^ (1 << (bit % 8))]))
    finally:
        vm.close()
    # the program itself counts 5 differing bits in each of its schedules
    out = g.run(f"kill -USR1 {program['pid']}; sleep 0.5; grep diff /tmp/aes.out")
    assert sorted(re.findall(r"diff (\d+) (\d+)", out)) == [("128", "5"), ("192", "5"), ("256", "5")]
    doc = keys_aes(g, "--pid", str(program["pid"]))
    assert {(k["bits"], k["key"], k["address"], k["bit_errors"]) for k in doc["keys"]} == \
        {(bits, key, addr, 5) for bits, (key, addr) in program["keys"].items()}
    # without the tolerance they are not found
    strict = keys_aes(g, "--pid", str(program["pid"]), "--max-errors", "4")
    assert strict["keys"] == []


def test_bad_input(g: Guest) -> None:
    assert_one_line_error(run_cli("keys", "aes", "--vm", f"qmp:{g.qmp_path}", "--pid", "999999"),
                          "no process 999999")
    assert_one_line_error(run_cli("keys", "aes", "--vm", f"qmp:{g.qmp_path}", "--max-errors", "-1"),
                          "--max-errors")


def test_found_in_a_dump(g: Guest, program: dict, tmp_path: Path) -> None:
    """The README's ``keys aes --vm mem.elf``: the same three keys (flipped or not: the dump is taken
    after the flip test when run in file order, so compare keys only) from an ELF dump of the guest."""
    dump = tmp_path / "mem.elf"
    r = run_cli("dump", "--vm", f"qmp:{g.qmp_path}", "-o", str(dump), timeout=300)
    assert r.returncode == 0, r.stderr
    r = run_cli("keys", "aes", "--vm", str(dump), "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    found = {(k["bits"], k["key"]) for k in json.loads(r.stdout)["keys"]}
    assert {(bits, key) for bits, (key, _a) in program["keys"].items()} <= found
    # and in the process's memory as the dump holds it
    r = run_cli("keys", "aes", "--vm", str(dump), "--pid", str(program["pid"]), "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    assert {(k["bits"], k["key"]) for k in json.loads(r.stdout)["keys"]} == \
        {(bits, key) for bits, (key, _a) in program["keys"].items()}
