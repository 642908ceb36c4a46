"""The kernel preconditions' logic with a simulated kernel (the real one: tests/netns/firewall/
test_preconditions.py; br_netfilter cannot be unloaded there, it is built in)."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from hyperfence.errors import KernelError
from hyperfence.model.kernel import Capabilities, Flavour, choose, describe, problems
from hyperfence.reconcile.preconditions import Preconditions


class FakeEngine:
    """What Preconditions uses of the engine: its namespace, store and flavour decision."""

    def __init__(self, store: Any, forced: Flavour | None) -> None:
        self.nft, self.store, self.netns = object(), store, "hf-x-host"
        self.forced_flavour = forced
        self.flavour = Flavour.BR_NETFILTER
        self.switches: list[Flavour] = []

    def use_flavour(self, caps: Capabilities) -> bool:
        wanted = choose(caps, self.forced_flavour)
        changed = wanted is not self.flavour
        self.flavour = wanted
        if changed:
            self.switches.append(wanted)
        return changed


class Kernel:
    def __init__(self, *, module: bool, sysctl: bool, loadable: bool = True, writable: bool = True) -> None:
        self.module, self.sysctl, self.loadable, self.writable = module, sysctl, loadable, writable
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.store = SimpleNamespace(add_event=lambda kind, data: self.events.append((kind, data)))
        self.forced: Flavour | None = None
        self.bridge_native = False  # does the simulated kernel have bridge conntrack and reject?

    def read(self, _: object) -> bool | None:
        return self.sysctl if self.module else None

    def fix(self, _: object) -> None:
        if self.writable:
            self.sysctl = True

    def load(self) -> str | None:
        if not self.loadable:
            return "modprobe: FATAL: Module br_netfilter not found"
        self.module = True
        return None

    def probe(self, nft: object) -> Capabilities:
        return Capabilities(self.bridge_native, self.bridge_native, self.module, self.read(nft))

    def preconditions(self) -> Preconditions:
        engine = FakeEngine(self.store, self.forced)
        return Preconditions(
            engine,  # type: ignore[arg-type]
            interval=0.001,
            reprobe=0.05,
            probe=self.probe,
            read=self.read,
            fix=self.fix,
            load=self.load,
        )


def test_a_missing_module_is_loaded_and_an_unloadable_one_stops_the_start() -> None:
    k = Kernel(module=False, sysctl=False)
    caps = k.preconditions().ensure()
    assert caps.br_netfilter and caps.call_iptables
    assert [kind for kind, _ in k.events] == ["precondition-repaired", "precondition-repaired"]
    k = Kernel(module=False, sysctl=False, loadable=False)
    with pytest.raises(KernelError) as e:
        k.preconditions().ensure()
    assert "modprobe br_netfilter" in str(e.value) and "Module br_netfilter not found" in str(e.value)


def test_a_sysctl_that_cannot_be_restored_is_reported_once_and_turns_the_status_red() -> None:
    k = Kernel(module=True, sysctl=True)
    p = k.preconditions()
    p.ensure()
    assert p.status()["stateful"] == "ok" and p.status()["problems"] == []
    k.sysctl, k.writable = False, False
    stop = threading.Event()
    t = threading.Thread(target=p.run, args=(stop,))
    t.start()
    try:
        for _ in range(2000):
            if p.status()["stateful"] == "broken":
                break
            threading.Event().wait(0.001)
        status = p.status()
        assert status["stateful"] == "broken" and "reads back as 0" in status["problems"][0], status
        threading.Event().wait(0.1)  # many more rounds: still one event for this episode
        assert [kind for kind, _ in k.events] == ["precondition-broken"]
        k.writable = True  # someone fixed what blocked the write: repaired, green again
        for _ in range(2000):
            if p.status()["stateful"] == "ok":
                break
            threading.Event().wait(0.001)
        assert p.status()["stateful"] == "ok" and p.status()["repairs"] == 1
    finally:
        stop.set()
        t.join()


def test_the_problem_text_says_what_to_do() -> None:
    off = Capabilities(True, True, True, False)
    assert off.bridge_native
    (text,) = problems(off, "ns1")
    assert "namespace ns1" in text and "sysctl -w net.bridge.bridge-nf-call-iptables=1" in text
    (text,) = problems(Capabilities(False, False, False, None), None)
    assert "modprobe br_netfilter" in text and "/etc/modules-load.d/" in text
    assert problems(Capabilities(False, False, True, True), None) == []
    assert "bridge conntrack no" in describe(Capabilities(False, False, True, True))


def test_bridge_native_is_picked_where_the_kernel_offers_it_and_needs_no_br_netfilter() -> None:
    k = Kernel(module=False, sysctl=False, loadable=False)
    k.bridge_native = True
    p = k.preconditions()
    caps = p.ensure()  # no br_netfilter and none loadable: a bridge_native kernel starts anyway
    assert p.engine.flavour is Flavour.BRIDGE_NATIVE and not caps.br_netfilter
    assert k.events == [] and p.status()["stateful"] == "ok" and p.status()["flavour"] == "bridge_native"
    assert p.status()["summary"].startswith("data plane bridge_native;")
    k.forced = Flavour.BR_NETFILTER  # a setting forces the other flavour: then br_netfilter is demanded
    with pytest.raises(KernelError, match="modprobe br_netfilter"):
        k.preconditions().ensure()


def test_a_forced_bridge_native_on_a_kernel_without_it_refuses_to_start() -> None:
    k = Kernel(module=True, sysctl=True)
    k.forced = Flavour.BRIDGE_NATIVE
    with pytest.raises(KernelError, match="nf_conntrack_bridge and nft_reject_bridge"):
        k.preconditions().ensure()


def test_a_reprobe_that_finds_bridge_native_gone_switches_the_flavour_and_converges() -> None:
    k = Kernel(module=True, sysctl=True)
    k.bridge_native = True
    p = k.preconditions()
    causes: list[str] = []
    p.on_change = causes.append
    p.ensure()
    assert p.engine.flavour is Flavour.BRIDGE_NATIVE
    k.bridge_native = False
    stop = threading.Event()
    t = threading.Thread(target=p.run, args=(stop,))
    t.start()
    try:
        for _ in range(2000):
            if causes:
                break
            threading.Event().wait(0.001)
    finally:
        stop.set()
        t.join()
    assert causes == ["data plane br_netfilter"] and p.engine.flavour is Flavour.BR_NETFILTER
    assert p.status()["stateful"] == "ok"
