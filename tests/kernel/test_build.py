"""Building BPF programs: cache, clang errors, missing toolchain."""

import os
import time

import pytest

from fastrelay.kernel import build
from fastrelay.kernel.errors import BuildError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRELAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_build_all_compiles_every_program_into_the_cache(cache):
    objs = build.build_all()
    assert set(objs) == {p.name.removesuffix(".bpf.c") for p in build.BPF_DIR.glob("*.bpf.c")}
    for path in objs.values():
        assert path.parent == cache and path.read_bytes()[:4] == b"\x7fELF"
    assert not list(build.BPF_DIR.rglob("*.o")), "objects must not land in the source tree"


def test_cached_object_is_reused(cache):
    first = build.build("udp_fanout")
    mtime = first.stat().st_mtime_ns
    time.sleep(0.01)
    assert build.build("udp_fanout") == first
    assert first.stat().st_mtime_ns == mtime


def test_source_change_gives_new_object(cache, tmp_path):
    src = tmp_path / "t.bpf.c"
    src.write_text('#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\nSEC("tc") int f(void *c) { return 0; }\n'
                   'char LICENSE[] SEC("license") = "GPL";\n')
    a = build.build(src)
    src.write_text(src.read_text().replace("return 0", "return 1"))
    assert build.build(src) != a


def test_compile_error_shows_clangs_message(cache, tmp_path):
    src = tmp_path / "broken.bpf.c"
    src.write_text("int f(void) { return undefined_thing; }\n")
    with pytest.raises(BuildError) as exc:
        build.build(src)
    assert "broken.bpf.c" in str(exc.value)
    assert "undefined_thing" in str(exc.value) and "error" in str(exc.value)


def test_unknown_program_name(cache):
    with pytest.raises(BuildError, match="no BPF source"):
        build.build("no_such_program")


def test_missing_clang_says_how_to_fix(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    build.find_clang.cache_clear()
    try:
        with pytest.raises(BuildError, match="make demo"):
            build.build("udp_fanout")
    finally:
        monkeypatch.setenv("PATH", os.defpath)
        build.find_clang.cache_clear()
