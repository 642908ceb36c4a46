"""model/kernel.py: the flavour setting, the choice of data plane, and what breaks each flavour's stateful
path (pure)."""

from __future__ import annotations

import pytest

from hyperfence.errors import InvalidInputError
from hyperfence.model.kernel import (
    CALL_IPTABLES,
    Capabilities,
    Flavour,
    choose,
    describe,
    parse_flavour,
    problems,
)

DEBIAN = Capabilities(bridge_conntrack=True, bridge_reject=True, br_netfilter=False, call_iptables=None)
THIS_KERNEL = Capabilities(bridge_conntrack=False, bridge_reject=False, br_netfilter=True, call_iptables=True)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (None, None),
        ("", None),
        ("auto", None),
        (" AUTO ", None),
        ("br_netfilter", Flavour.BR_NETFILTER),
        ("bridge-native", Flavour.BRIDGE_NATIVE),
    ],
)
def test_the_flavour_setting(text: str | None, want: Flavour | None) -> None:
    assert parse_flavour(text) is want


def test_an_unknown_flavour_names_the_field_the_value_and_the_choices() -> None:
    with pytest.raises(InvalidInputError) as e:
        parse_flavour("iptables", field="--flavour")
    assert str(e.value) == (
        "--flavour: 'iptables' is not a data plane flavour; expected one of auto, br_netfilter, bridge_native"
    )


def test_bridge_native_only_where_the_kernel_has_both_bridge_conntrack_and_reject() -> None:
    assert choose(DEBIAN, None) is Flavour.BRIDGE_NATIVE
    assert choose(THIS_KERNEL, None) is Flavour.BR_NETFILTER
    half = Capabilities(bridge_conntrack=True, bridge_reject=False, br_netfilter=True, call_iptables=True)
    assert not half.bridge_native and choose(half, None) is Flavour.BR_NETFILTER
    assert choose(DEBIAN, Flavour.BR_NETFILTER) is Flavour.BR_NETFILTER  # forced wins
    assert choose(THIS_KERNEL, Flavour.BRIDGE_NATIVE) is Flavour.BRIDGE_NATIVE


def test_what_breaks_each_flavour_says_what_to_do() -> None:
    assert problems(DEBIAN, "ns", Flavour.BRIDGE_NATIVE) == []
    assert problems(THIS_KERNEL, "ns", Flavour.BR_NETFILTER) == []
    (native,) = problems(THIS_KERNEL, "ns", Flavour.BRIDGE_NATIVE)
    assert "nf_conntrack_bridge and nft_reject_bridge" in native and "modprobe" in native
    assert "namespace ns" in native
    (module,) = problems(DEBIAN, None, Flavour.BR_NETFILTER)
    assert (
        module.startswith("br_netfilter is not loaded (the host's namespace)")
        and "modprobe br_netfilter" in module
    )
    off = Capabilities(bridge_conntrack=False, bridge_reject=False, br_netfilter=True, call_iptables=False)
    (sysctl,) = problems(off, "ns")
    assert (
        sysctl.startswith(f"{CALL_IPTABLES} is 0 (namespace ns)") and f"sysctl -w {CALL_IPTABLES}=1" in sysctl
    )


def test_the_summary_line() -> None:
    assert describe(DEBIAN, Flavour.BRIDGE_NATIVE) == (
        f"data plane bridge_native; kernel: bridge conntrack yes, bridge reject yes, br_netfilter no ({CALL_IPTABLES} -)"
    )
    assert describe(THIS_KERNEL).endswith(f"br_netfilter yes ({CALL_IPTABLES} 1)")
    assert DEBIAN.as_dict() == {
        "bridge_conntrack": True,
        "bridge_reject": True,
        "br_netfilter": False,
        "bridge_nf_call_iptables": None,
    }
