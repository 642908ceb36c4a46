"""Reading libvirt's domain XML, naming its events, and building the lab's domain XML. No libvirtd."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyperfence.codec.libvirt_xml import (
    AGENT_CHANNEL,
    XMLNS,
    DomainInfo,
    DomainNic,
    dac_baselabel,
    dac_label,
    device_kind,
    labels_xml,
    lifecycle_kind,
    metadata_detail,
    network_lease,
    parse_domain_xml,
    state_name,
    with_fw_cfg_file,
)
from hyperfence.errors import InvalidInputError
from hyperfence.lab.domains import DomainSpec, domain_xml, lab_domain_spec
from hyperfence.lab.plan import plan_lab
from hyperfence.lab.topology import state_dir


def tree(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 - our own XML


UUID = "5cf0cccd-3b32-4699-b03f-5839a5873aeb"

RUNNING = f"""
<domain type='qemu' id='7'>
  <name>web1</name>
  <uuid>{UUID.upper()}</uuid>
  <metadata>
    <other:thing xmlns:other="https://example.com/other"><label key="tier">not ours</label></other:thing>
    <hf:labels xmlns:hf="{XMLNS}">
      <hf:label key="tier">web</hf:label>
      <label key="env"> prod </label>
      <label>no key: ignored</label>
    </hf:labels>
  </metadata>
  <devices>
    <interface type='bridge'>
      <mac address='52:54:00:AB:CD:01'/>
      <source bridge='br0'/>
      <target dev='vnet3'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:ab:cd:02'/>
      <source network='default' portid='1f0e' bridge='virbr0'/>
      <target dev='vnet4'/>
    </interface>
    <interface type='user'>
      <mac address='52:54:00:ab:cd:03'/>
    </interface>
    <interface type='bridge'><source bridge='br9'/></interface>
    <channel type='unix'>
      <source mode='bind' path='/run/qga.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='/run/hf/web1.sock'/>
      <target type='virtio' name='{AGENT_CHANNEL}' state='disconnected'/>
    </channel>
  </devices>
</domain>
"""


def test_running_domain() -> None:
    info = parse_domain_xml(RUNNING, state="running")
    assert info == DomainInfo(
        uuid=UUID,
        name="web1",
        state="running",
        interfaces=(
            DomainNic(mac="52:54:00:ab:cd:01", tap="vnet3", bridge="br0"),
            DomainNic(mac="52:54:00:ab:cd:02", tap="vnet4", bridge="virbr0"),
            DomainNic(mac="52:54:00:ab:cd:03", tap=None, bridge=None),
        ),
        agent_socket="/run/hf/web1.sock",
        labels={"tier": "web", "env": "prod"},
        domain_id=7,
    )
    assert info.is_active


def test_a_shut_off_domain_has_no_taps_even_with_a_configured_target() -> None:
    info = parse_domain_xml(RUNNING.replace(" id='7'", ""), state="shutoff")
    assert [nic.tap for nic in info.interfaces] == [None, None, None]
    assert not info.is_active and info.domain_id is None


def test_missing_pieces() -> None:
    bare = f"<domain type='kvm'><name>x</name><uuid>{UUID}</uuid><devices/></domain>"
    info = parse_domain_xml(bare)
    assert (info.interfaces, info.agent_socket, info.labels, info.state) == ((), None, {}, "unknown")
    other_channel = RUNNING.replace(AGENT_CHANNEL, "org.example.other")
    assert parse_domain_xml(other_channel).agent_socket is None
    pty_channel = bare.replace(
        "<devices/>",
        f"<devices><channel type='pty'><target type='virtio' name='{AGENT_CHANNEL}'/></channel></devices>",
    )
    assert parse_domain_xml(pty_channel).agent_socket is None


@pytest.mark.parametrize(
    ("xml", "found"),
    [
        ("<domain><name>x</name>", "not well-formed"),
        ("<network><name>x</name></network>", "domain.uuid: missing"),
        (f"<domain><uuid>{UUID}</uuid></domain>", "domain.name: missing"),
        ("<pool/>", "root element is <pool>"),
    ],
)
def test_not_a_domain(xml: str, found: str) -> None:
    with pytest.raises(InvalidInputError, match=found):
        parse_domain_xml(xml)


def test_whom_qemu_runs_as() -> None:
    running = RUNNING.replace(
        "<devices>",
        "<seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+109</label>"
        "<imagelabel>+64055:+109</imagelabel></seclabel><devices>",
    )
    assert dac_label(running) == ("+64055:+109", "qemu")
    static = RUNNING.replace(
        "<devices>", "<seclabel type='static' model='dac'><label>qemu:qemu</label></seclabel><devices>"
    )
    assert dac_label(static.replace("type='qemu'", "type='kvm'")) == ("qemu:qemu", "kvm")
    assert dac_label(RUNNING) == (None, "qemu")
    selinux_only = RUNNING.replace(
        "<devices>", "<seclabel type='dynamic' model='selinux'><label>x</label></seclabel><devices>"
    )
    assert dac_label(selinux_only) == (None, "qemu")
    caps = """<capabilities><host>
      <secmodel><model>none</model><doi>0</doi></secmodel>
      <secmodel><model>dac</model><doi>0</doi>
        <baselabel type='kvm'>+64055:+64055</baselabel><baselabel type='qemu'>+0:+0</baselabel></secmodel>
    </host></capabilities>"""
    assert dac_baselabel(caps, "kvm") == "+64055:+64055"
    assert dac_baselabel(caps, "qemu") == "+0:+0"
    assert dac_baselabel(caps, "xen") is None
    assert dac_baselabel("<capabilities><host/></capabilities>", "kvm") is None
    with pytest.raises(InvalidInputError):
        dac_baselabel("<capabilities>", "kvm")


def test_metadata_change_details() -> None:
    assert metadata_detail(2, "https://hyperfence.dev/xmlns/1") == "hyperfence"
    assert metadata_detail(2, "http://example.org/x") == "element http://example.org/x"
    assert (metadata_detail(0, None), metadata_detail(1, None), metadata_detail(9, None)) == (
        "description",
        "title",
        "metadata-9",
    )


def test_lifecycle_names() -> None:
    assert lifecycle_kind(0, 0) == ("defined", "added")
    assert lifecycle_kind(1, 0) == ("undefined", "removed")
    assert lifecycle_kind(2, 0) == ("started", "booted")
    assert lifecycle_kind(3, 0) == ("paused", "paused")
    assert lifecycle_kind(4, 0) == ("resumed", "unpaused")  # the running reason unknown: libvirt's words
    assert lifecycle_kind(5, 1) == ("stopped", "destroyed")
    assert lifecycle_kind(2, 1) == ("migrated", "in")
    assert lifecycle_kind(5, 3) == ("migrated", "out")
    assert lifecycle_kind(7, 0) == ("paused", "memory")
    assert lifecycle_kind(42, 3) == ("event-42", "detail-3")
    assert lifecycle_kind(5, 99) == ("stopped", "detail-99")
    assert state_name(1) == "running" and state_name(3) == "paused" and state_name(5) == "shutoff"
    assert state_name(99) == "state-99"


def test_started_resumed_and_unpaused_are_told_apart_by_the_running_reason() -> None:
    """What libvirt 9 sends (seen with `virsh event --all --loop` and the domain's state read in the
    callback): `virsh start` = RESUMED unpaused (reason booted) + STARTED booted; `virsh resume` = RESUMED
    unpaused (reason unpaused); `virsh restore` = STARTED restored + RESUMED from-snapshot (reason restored)."""
    booted, unpaused, migrated, restored = 1, 5, 2, 3
    start = [lifecycle_kind(4, 0, running_reason=booted), lifecycle_kind(2, 0)]
    assert [e for e in start if e is not None] == [("started", "booted")]  # a start is one event
    assert lifecycle_kind(4, 0, running_reason=unpaused) == ("unpaused", "unpaused")
    assert lifecycle_kind(4, 1, running_reason=migrated) == ("resumed", "migrated")
    restore = [lifecycle_kind(2, 2), lifecycle_kind(4, 2, running_reason=restored)]
    assert restore == [("started", "restored"), ("resumed", "from-snapshot")]
    assert lifecycle_kind(2, 0, running_reason=booted) == ("started", "booted")  # only RESUMED depends on it
    assert lifecycle_kind(3, 0, running_reason=unpaused) == ("paused", "paused")


def test_device_events() -> None:
    assert device_kind("net1", added=True) == "nic-added"
    assert device_kind("net0", added=False) == "nic-removed"
    assert device_kind("ua-mynic", added=True) == "device-added"
    assert device_kind("network", added=False) == "device-removed"
    assert device_kind("virtio-disk0", added=True) == "device-added"


def test_labels_for_set_metadata_carry_no_namespace() -> None:
    plain = labels_xml({"b": "2", "a": "1"}, namespaced=False)
    assert plain == '<labels><label key="a">1</label><label key="b">2</label></labels>'
    assert "hf:label" in labels_xml({"a": "1"})


label_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FFF, exclude_characters="\x7f"))


@given(st.dictionaries(label_text.filter(bool), label_text.map(str.strip), max_size=5))
def test_labels_round_trip(labels: dict[str, str]) -> None:
    xml = f"<domain><name>x</name><uuid>{UUID}</uuid><metadata>{labels_xml(labels)}</metadata></domain>"
    assert parse_domain_xml(xml).labels == labels


# --- the lab's domains ------------------------------------------------------------------------------------


def test_lab_domain_round_trips_through_the_parser() -> None:
    plan = plan_lab("t1", 3)
    spec = lab_domain_spec(
        plan,
        "vm2",
        kernel="/img/vmlinuz",
        initrd="/img/initrd",
        labels={"tier": "db"},
    )
    xml = domain_xml(dataclasses.replace(spec, uuid=UUID))
    root = tree(xml)
    root.set("id", "3")  # as libvirt shows a running domain
    info = parse_domain_xml(ET.tostring(root, encoding="unicode"))
    vm2 = plan.vm("vm2")
    qdir = state_dir("t1") / "qemu"
    assert info.name == "hf-t1-vm2"
    assert info.interfaces == (DomainNic(mac=vm2.mac, tap="vp2", bridge="br0"),)
    assert info.agent_socket == str(qdir / "vm2.agent.sock")
    assert info.labels == {"tier": "db", "lab": "t1", "vm": "vm2"}

    assert root.get("type") == "qemu"
    assert root.findtext("os/kernel") == "/img/vmlinuz"
    assert root.findtext("os/initrd") == "/img/initrd"
    assert root.findtext("memory") == "256"
    assert root.find("devices/interface/model").get("type") == "virtio"  # type: ignore[union-attr]
    assert root.find("devices/serial/source").get("path") == str(qdir / "vm2.console.log")  # type: ignore[union-attr]
    assert root.findtext("os/cmdline") == f"console=ttyS0 panic=-1 quiet hf.ip={vm2.ip}/22 hf.gw=10.77.0.1"
    # the agent's config (its key) is a fw_cfg file, never on the command line that `ps` shows
    entry = root.find("sysinfo[@type='fwcfg']/entry")
    assert entry is not None and entry.get("name") == "opt/org.hyperfence/agent"
    assert entry.get("file") == str(qdir / "vm2.agent.json") and entry.text is None
    ports = {c.find("target").get("name"): c.find("source").get("path") for c in root.iter("channel")}  # type: ignore[union-attr]
    assert ports == {
        "org.hyperfence.agent.0": str(qdir / "vm2.agent.sock"),
        "org.hyperfence.lab.shell": str(qdir / "vm2.shell.sock"),
    }
    assert [root.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3


def test_a_disk_less_domain_only_has_an_os_type() -> None:
    spec = lab_domain_spec(plan_lab("t1", 1), "vm1", memory_mib=64)
    root = tree(domain_xml(spec))
    assert [child.tag for child in root.find("os")] == ["type"]  # type: ignore[union-attr]
    assert root.find("sysinfo") is None and len(list(root.iter("channel"))) == 1  # no agent file, no shell
    assert root.findtext("memory") == "64"


def test_domain_xml_rejects_every_bad_field() -> None:
    spec = DomainSpec(
        name="a b",
        mac="52:54:00:00:00:01",
        bridge="br0",
        tap="vp1'",
        channel_path="relative.sock",
        console_path="/ok.log",
        shell_path="shell.sock",
        labels={},
        memory_mib=8,
        uuid="nope",
    )
    with pytest.raises(InvalidInputError) as exc:
        domain_xml(spec)
    assert [p.path for p in exc.value.problems] == [
        "name",
        "tap",
        "channel_path",
        "shell_path",
        "uuid",
        "memory_mib",
    ]


def test_kernel_and_initrd_come_together() -> None:
    with pytest.raises(InvalidInputError, match="give both or neither"):
        lab_domain_spec(plan_lab("t1", 1), "vm1", kernel="/k")


def test_unknown_lab_vm() -> None:
    with pytest.raises(Exception, match="no VM called 'vm9'"):
        lab_domain_spec(plan_lab("t1", 1), "vm9")
    assert Path(lab_domain_spec(plan_lab("t1", 1), "vm1").channel_path).name == "vm1.agent.sock"


# --- handing the agent its config (fw_cfg) --------------------------------------------------------------

DEFINED = f"""<domain type='kvm'>
  <name>web1</name><uuid>{UUID}</uuid>
  <metadata><hf:labels xmlns:hf="{XMLNS}"><hf:label key="tier">web</hf:label></hf:labels></metadata>
  <memory unit='KiB'>262144</memory>
  <os><type>hvm</type></os>
  <devices><graphics type='vnc' passwd='s3cret'/></devices>
</domain>"""


def test_a_fw_cfg_entry_is_added_once_and_the_rest_is_kept() -> None:
    once = with_fw_cfg_file(DEFINED, "opt/org.hyperfence/agent", "/var/lib/hf/web1.json")
    twice = with_fw_cfg_file(once, "opt/org.hyperfence/agent", "/var/lib/hf/web1-new.json")
    root = tree(twice)
    entries = root.findall("sysinfo[@type='fwcfg']/entry")
    assert [(e.get("name"), e.get("file")) for e in entries] == [
        ("opt/org.hyperfence/agent", "/var/lib/hf/web1-new.json")
    ]
    assert [c.tag for c in root][:5] == ["name", "uuid", "metadata", "memory", "sysinfo"]
    info = parse_domain_xml(twice)
    assert (info.name, info.uuid, info.labels) == ("web1", UUID, {"tier": "web"})
    assert root.find("devices/graphics").get("passwd") == "s3cret"  # type: ignore[union-attr]
    other = with_fw_cfg_file(twice, "opt/com.example/x", "/x")
    assert len(tree(other).findall("sysinfo[@type='fwcfg']/entry")) == 2


def test_a_fw_cfg_entry_qemu_would_not_take_is_refused_with_every_reason() -> None:
    with pytest.raises(InvalidInputError) as exc:
        with_fw_cfg_file("<network/>", "agent", "relative,path")
    assert [p.path for p in exc.value.problems] == ["name", "path", "xml"]
    with pytest.raises(InvalidInputError, match="not XML"):
        with_fw_cfg_file("<domain", "opt/a/b", "/x")


LEASE = {
    "iface": "virbr0",
    "expirytime": 1_800_000_000,
    "type": 0,
    "mac": "52:54:00:AA:bb:cc",
    "ipaddr": "192.168.122.50",
    "prefix": 24,
    "hostname": "x" * 100_000,  # the guest's own words: never read
    "clientid": None,
    "iaid": None,
}


def test_a_libvirt_lease_entry_is_read_by_type_and_size_and_its_guest_strings_are_not_kept() -> None:
    got = network_lease(LEASE, "default")
    assert got is not None and not isinstance(got, str)
    assert (got.network, got.bridge, got.mac, str(got.ip), got.expires) == (
        "default",
        "virbr0",
        "52:54:00:aa:bb:cc",
        "192.168.122.50",
        1_800_000_000.0,
    )
    assert "x" * 50 not in repr(got)
    assert network_lease({**LEASE, "expirytime": 0}, "default").expires is None  # type: ignore[union-attr]
    assert network_lease({**LEASE, "type": 1, "ipaddr": "fd00::5"}, "default") is None  # IPv6: not learned


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"mac": "52:54:00:aa:bb"}, "mac"),
        ({"mac": "52:54:00:aa:bb:gg"}, "mac"),
        ({"mac": None}, "mac"),
        ({"mac": "5" * 10_000}, "mac"),
        ({"ipaddr": "192.168.122.256"}, "ipaddr"),
        ({"ipaddr": "1" * 10_000}, "ipaddr"),
        ({"ipaddr": 5}, "ipaddr"),
        ({"iface": ""}, "iface"),
        ({"iface": "a" * 16}, "iface"),
        ({"expirytime": -1}, "expirytime"),
        ({"expirytime": 2**62}, "expirytime"),
        ({"expirytime": "soon"}, "expirytime"),
        ({"expirytime": True}, "expirytime"),
    ],
)
def test_a_malformed_libvirt_lease_entry_is_refused_with_the_field_and_a_short_value(
    change: dict[str, object], reason: str
) -> None:
    got = network_lease({**LEASE, **change}, "default")
    assert isinstance(got, str) and got.startswith(reason), got
    assert len(got) < 120  # a huge value is cut short in the message
    assert isinstance(network_lease(["not", "a", "dict"], "default"), str)
