"""Choosing the lab guest's kernel package (hyperfence.lab.guest_kernel)."""

from __future__ import annotations

from hyperfence.lab.guest_kernel import KernelPackage, newest_package_name


def test_newest_package_name_compares_abi_numbers_not_text() -> None:
    names = [
        "linux-image-6.1.0-9-amd64",
        "linux-image-6.1.0-56-amd64",
        "linux-image-6.1.0-100-cloud-amd64",
        "linux-image-6.1.0-101-rt-amd64",
        "linux-image-6.1.0-55-amd64",
        "linux-image-6.1.0-57-amd64-dbg",
        "linux-image-amd64",
    ]
    assert newest_package_name(names) == "linux-image-6.1.0-56-amd64"
    assert newest_package_name(["linux-image-amd64"]) is None


def test_kernel_release_is_the_package_name_without_prefix() -> None:
    assert KernelPackage("linux-image-6.1.0-56-amd64", "6.1.192-2").release == "6.1.0-56-amd64"
