"""Which parts of Debian's Python the lab guest gets (hyperfence.lab.guest_python)."""

from __future__ import annotations

import pytest

from hyperfence.lab.guest_python import is_pruned, package_inits, parse_ldd, stdlib_files

LIB = "/usr/lib/python3.11"


def test_stdlib_files_keeps_traced_stdlib_files_only() -> None:
    traced = {
        "sys": None,  # built in
        "zipimport": None,  # frozen
        "os": f"{LIB}/os.py",
        "json": f"{LIB}/json/__init__.py",
        "json.decoder": f"{LIB}/json/decoder.py",
        "_ssl": f"{LIB}/lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so",
        "sitecustomize": f"{LIB}/sitecustomize.py",  # Debian's apport hook
        "unittest": f"{LIB}/unittest/__init__.py",
        "hyperfence.agent.main": "/opt/hyperfence-agent.pyz/hyperfence/agent/main.py",
        "_distutils_hack": "/usr/lib/python3/dist-packages/_distutils_hack/__init__.py",
        "cached": f"{LIB}/__pycache__/os.cpython-311.pyc",
    }
    assert stdlib_files(traced, stdlib=LIB) == [
        "json/__init__.py",
        "json/decoder.py",
        "lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so",
        "os.py",
    ]


@pytest.mark.parametrize(
    ("rel", "pruned"),
    [
        ("test/support/__init__.py", True),
        ("idlelib/idle.py", True),
        ("tkinter/__init__.py", True),
        ("ensurepip/__init__.py", True),
        ("lib2to3/pytree.py", True),
        ("pydoc_data/topics.py", True),
        ("distutils/core.py", True),
        ("turtle.py", True),
        ("config-3.11-x86_64-linux-gnu/Makefile", True),
        ("os.py", False),
        ("json/decoder.py", False),
        ("lib-dynload/_json.cpython-311-x86_64-linux-gnu.so", False),
        ("testing.py", False),
    ],
)
def test_is_pruned(rel: str, *, pruned: bool) -> None:
    assert is_pruned(rel) is pruned


def test_package_inits_adds_every_parent_package() -> None:
    assert package_inits(["os.py", "a/b/c.py", "a/x.py", "lib-dynload/_ssl.so"]) == [
        "a/__init__.py",
        "a/b/__init__.py",
    ]


def test_parse_ldd_lists_libraries_and_the_loader() -> None:
    text = (
        "\tlinux-vdso.so.1 (0x00007ffd1b5f2000)\n"
        "\tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f040fe71000)\n"
        "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f040fc45000)\n"
        "\t/lib64/ld-linux-x86-64.so.2 (0x00007f040ff65000)\n"
    )
    assert parse_ldd(text) == [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
    ]


def test_parse_ldd_refuses_a_missing_library() -> None:
    with pytest.raises(ValueError, match=r"libssl\.so\.3 => not found"):
        parse_ldd("\tlibssl.so.3 => not found\n")
