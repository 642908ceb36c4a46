from __future__ import annotations

from hyperfence.health.heartbeat import heartbeat_for
from hyperfence.model.policy import DEFAULT_BOOT_GRACE, DEFAULT_HEARTBEAT, Release, SilenceAction
from hyperfence.policy.parse import parse_policy
from tests.unit.policy.test_parse import doc, problems


def test_first_matching_entry_wins_and_the_default_is_isolate() -> None:
    p = parse_policy(
        doc(
            heartbeats=[
                {"id": "web", "vms": "label:role=web", "interval": 2, "misses": 5, "action": "alert"},
                {"id": "all", "vms": "vms", "interval": 0.5, "release": "manual", "action": "pause"},
            ]
        )
    )
    vm1, vm2 = p.vms
    hb1, hb2 = heartbeat_for(p, vm1), heartbeat_for(p, vm2)
    assert (hb1.id, hb1.silent_after, hb1.action) == ("web", 10.0, SilenceAction.ALERT)
    assert (hb2.id, hb2.silent_after, hb2.release) == ("all", 1.5, Release.MANUAL)
    assert heartbeat_for(parse_policy(doc()), vm1) == DEFAULT_HEARTBEAT
    assert DEFAULT_HEARTBEAT.action is SilenceAction.ISOLATE and DEFAULT_HEARTBEAT.silent_after == 3.0
    assert hb1.boot_grace == DEFAULT_HEARTBEAT.boot_grace == DEFAULT_BOOT_GRACE == 60.0


def test_boot_grace_is_a_setting_of_each_entry() -> None:
    p = parse_policy(doc(heartbeats=[{"vms": "vms", "boot_grace": 0}, {"vms": "vm:vm1", "boot_grace": 300}]))
    assert [hb.boot_grace for hb in p.heartbeats] == [0.0, 300.0]
    got = "\n".join(
        problems(doc(heartbeats=[{"vms": "vms", "boot_grace": -1}, {"vms": "vms", "boot_grace": "60"}]))
    )
    assert "heartbeats[0].boot_grace: Input should be greater than or equal to 0" in got
    assert "heartbeats[1].boot_grace: Input should be a valid number (got '60')" in got


def test_heartbeat_mistakes_are_located() -> None:
    got = "\n".join(
        problems(
            doc(
                heartbeats=[
                    {"vms": "vm:ghost"},
                    {"vms": "any"},
                    {"vms": "vms", "action": "reboot", "misses": "3", "interval": 0.01},
                    {"vms": "vms", "interval": "1"},
                ]
            )
        )
    )
    assert "heartbeats[0].vms: VM 'ghost' is not declared" in got
    assert "heartbeats[1].vms: 'any' selects addresses" in got
    assert "heartbeats[2].action" in got and "heartbeats[2].misses" in got
    assert "heartbeats[2].interval: Input should be greater than or equal to 0.2" in got
    assert "heartbeats[3].interval: Input should be a valid number (got '1')" in got
