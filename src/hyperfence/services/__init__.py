"""The use cases, one function each, called alike by every front end: the CLI (`cli/`), the daemon's control
socket (`daemon.py`) and, next, the REST API. Inputs are plain values (a policy document, a generation, a
VM name), outputs plain dataclasses and dicts; nothing here prints, exits or knows typer. Errors are the
classes of `hyperfence/errors.py`, which its one table maps to exit codes and HTTP statuses.

    policy.py    check_policy, preview_policy (diff + kernel dry run, nothing stored), apply_policy,
                 show_policy
    ruleset.py   desired_state (the one place the desired state comes from), probe_kernel, show_ruleset,
                 diff_ruleset, ruleset_stats
    status.py    daemon_status
    events.py    list_events

They work over ports: the repository ports of `hyperfence/ports.py` (PolicyRepository, EventLog, ...) and
`services/ports.py`'s `Kernel` (what `reconcile/engine.py:Engine` offers: the compiled policy, the kernel's
state, converging) and `Ask` (a running daemon's control socket), so the unit tests run them on the
in-memory fakes of `hyperfence.testing`.
"""
