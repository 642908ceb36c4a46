"""A real `hyperfence daemon` process on a lab, for kernel tests."""

from __future__ import annotations

import subprocess
import sys
import time

from hyperfence.daemon import request as daemon_request
from hyperfence.lab.session import LabSession


def start_daemon(lab: LabSession) -> tuple[subprocess.Popen[bytes], str]:
    """A `hyperfence daemon` on the lab (periodic resync: an hour), once its first converge has ended: its
    control socket answers `status` with the policy it converged to (None until then). Returns the process
    and that policy key."""
    hf = [sys.executable, "-m", "hyperfence", "--netns", lab.plan.host_netns, "--state-dir", lab.state_dir]
    p = subprocess.Popen([*hf, "daemon", "--resync", "3600"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    try:
        while True:
            assert p.poll() is None, f"the daemon exited with status {p.returncode}"
            reply = daemon_request(lab.state_dir, {"op": "status"}, timeout=5)
            if reply is not None and reply.get("policy"):
                return p, str(reply["policy"])
            assert time.monotonic() < deadline, f"no first converge within 30 s: {reply}"
            time.sleep(0.05)
    except BaseException:
        p.kill()
        p.wait()
        raise
