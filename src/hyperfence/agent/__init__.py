"""hyperfence-agent: runs inside a guest, reports to the host over one per-VM channel. Standard library
only, Python >= 3.9: this package is shipped alone as a zipapp (`hyperfence agent build`)."""

AGENT_VERSION = "0.1.0"
