"""nftables through libnftables (the library behind the `nft` command), JSON in and out.

Why not `subprocess.run(["nft", "-j", "-f", "-"])`: each `nft` start costs ~26 ms, which alone would eat the
apply budget at 1,000 VMs. libnftables takes the very same JSON batch (`nft -j -f` is a thin wrapper around
`nft_run_cmd_from_buffer`) and the kernel still applies each batch as one atomic transaction. The context
lives on a `NetnsThread`, so its netlink socket is in the namespace that holds the bridge.

Errors from libnftables are translated here into `KernelError` carrying nft's own message.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import json
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from hyperfence.codec import nft_batch, nft_rules
from hyperfence.errors import KernelError, NotFoundError
from hyperfence.system.netlink import NETLINK_NETFILTER
from hyperfence.system.netns import NetnsThread

T = TypeVar("T")

# From <nftables/libnftables.h>
NFT_CTX_DEFAULT = 0
OUTPUT_HANDLE = 1 << 3
OUTPUT_JSON = 1 << 4
OUTPUT_NUMERIC_PROTO = 1 << 7
OUTPUT_NUMERIC_PRIO = 1 << 8
OUTPUT_NUMERIC_SYMBOL = 1 << 9
OUTPUT_NUMERIC_TIME = 1 << 10
OUTPUT_FLAGS = (
    OUTPUT_HANDLE
    | OUTPUT_JSON
    | OUTPUT_NUMERIC_PROTO
    | OUTPUT_NUMERIC_PRIO
    | OUTPUT_NUMERIC_SYMBOL
    | OUTPUT_NUMERIC_TIME
)


def _load() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libnftables.so.1")
    except OSError:
        raise NotFoundError(
            "libnftables.so.1 is missing: install Debian's `nftables` package (./setup.sh install does it)"
        ) from None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
    return lib


class Nft:
    """One libnftables context in one network namespace (None: the daemon's own)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._lib = _load()
        self._thread = NetnsThread(netns, name="hyperfence-nft")
        self._ctx: int = self._thread.call(self._new_ctx)
        self._sock = self._thread.call(_open_socket)
        self._seq = 0
        # Which namespace this is (its generation numbers mean nothing in another one, or a re-created one).
        self._netns_id = self._thread.call(_namespace_id)
        # For rule changes sent to nf_tables directly (`encode_rules`, `commit_rules`): a libnftables context
        # in a private, nearly empty namespace, and a socket of our own for the batches' acknowledgements.
        self._stage: tuple[NetnsThread, int, socket.socket] | None = None
        self._stage_failed: str | None = None
        self._commit_sock: socket.socket | None = None

    @property
    def thread_id(self) -> int:
        """The id of the thread that commits this context's batches (nftables' "by process N")."""
        return self._thread.native_id

    def _new_ctx(self) -> int:
        ctx = self._lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if not ctx:
            raise KernelError("libnftables: nft_ctx_new failed")
        self._lib.nft_ctx_output_set_flags(ctx, OUTPUT_FLAGS)
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)
        return int(ctx)

    def _run(self, text: str) -> tuple[int, str, str]:
        def call() -> tuple[int, str, str]:
            lib, ctx = self._lib, self._ctx
            rc = lib.nft_run_cmd_from_buffer(ctx, text.encode())
            out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            return rc, out, err

        return self._thread.call(call)

    def apply(self, batch: dict[str, Any]) -> None:
        """Apply one JSON batch atomically. Raises KernelError; nothing is applied then."""
        if not batch.get("nftables"):
            return
        rc, _, err = self._run(orjson.dumps(batch).decode())
        if rc != 0:
            raise KernelError(
                f"nftables refused the batch ({len(batch['nftables'])} commands); nothing was "
                f"changed:\n{_trim(err)}"
            )

    def check(self, batch: dict[str, Any]) -> str | None:
        """Send `batch` to the kernel as a dry run (`nft --check`): the kernel validates every command and
        the transaction is aborted, so nothing changes and no event is sent. None when the kernel would take
        it, else nft's error text (e.g. an expression this kernel does not have)."""
        lib = self._lib

        def call() -> tuple[int, str]:
            ctx = self._ctx
            lib.nft_ctx_set_dry_run(ctx, True)
            try:
                rc = lib.nft_run_cmd_from_buffer(ctx, orjson.dumps(batch))
                lib.nft_ctx_get_output_buffer(ctx)  # (drained: the next call starts empty)
                return rc, (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            finally:
                lib.nft_ctx_set_dry_run(ctx, False)

        rc, err = self._thread.call(call)
        return None if rc == 0 else _trim(err, 500)

    def in_netns(self, fn: Callable[[], T]) -> T:
        """Run `fn` in this context's namespace (e.g. read a per-namespace sysctl), in order with its
        batches."""
        return self._thread.call(fn)

    def list(self, what: dict[str, Any]) -> list[Any]:
        """Run one `list` command (e.g. {"table": {"family": "bridge", "name": "hyperfence"}}); returns the
        `nftables` array, or [] when the object does not exist."""
        rc, out, err = self._run(json.dumps({"nftables": [{"list": what}]}))
        if rc != 0:
            if "No such file or directory" in err:
                return []
            raise KernelError(f"nftables could not list {what}: {_trim(err)}")
        objs: list[Any] = orjson.loads(out)["nftables"]
        return [o for o in objs if "metainfo" not in o]

    def rule_ids(self, family: str, table: str, chain: str) -> builtins.list[tuple[int, str]]:
        """(handle, comment) of every rule of one chain, in order, straight from the kernel ([] if absent)."""
        self._seq += 1
        seq = self._seq
        return self._thread.call(lambda: _read_rule_ids(self._sock, family, table, chain, seq))

    def generation(self) -> nft_rules.Generation:
        """The namespace's nftables generation: changed by every commit, by anyone (codec/nft_rules.py);
        with the namespace's identity, so that no other namespace's generation can equal it."""
        if self._netns_id is None:
            raise KernelError(
                "this kernel does not identify network namespaces (SO_NETNS_COOKIE, Linux 5.14)"
            )
        self._seq += 1
        seq = self._seq
        return nft_rules.Generation(
            self._netns_id, self._thread.call(lambda: _read_generation(self._sock, seq))
        )

    def encode_rules(
        self, setup: dict[str, Any], family: str, table: str, chains: builtins.list[str]
    ) -> dict[tuple[str, str], tuple[bytes, bytes]]:
        """Let libnftables encode rules without paying for this namespace's cache: `setup` (a JSON batch that
        creates `table`, the sets and chains its rules name, and the rules) is applied in a private namespace
        that holds nothing else, and every rule of `chains` there is read back as nf_tables holds it: (chain,
        comment) -> (expressions, userdata), ready for `commit_rules`. KernelError when it cannot."""
        if self._stage is None:
            if self._stage_failed is not None:  # tried once: not again at every change
                raise KernelError(self._stage_failed)
            try:
                stage = NetnsThread(None, name="hyperfence-nft-stage", private=True)
            except OSError as e:  # e.g. no CAP_SYS_ADMIN for a namespace of its own
                self._stage_failed = f"no private namespace to encode rules in: {e}"
                raise KernelError(self._stage_failed) from None
            try:
                self._stage = (stage, stage.call(self._new_ctx), stage.call(_open_socket))
            except BaseException:
                stage.close()
                raise
        thread, ctx, sock = self._stage
        lib = self._lib

        def call() -> dict[tuple[str, str], tuple[bytes, bytes]]:
            rc = lib.nft_run_cmd_from_buffer(ctx, orjson.dumps(setup))
            lib.nft_ctx_get_output_buffer(ctx)
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            if rc != 0:
                raise KernelError(f"libnftables could not encode the rules: {_trim(err, 500)}")
            bodies: dict[tuple[str, str], tuple[bytes, bytes]] = {}
            for n, chain in enumerate(chains):
                sock.send(nft_rules.dump_request(family, table, chain, n + 1))
                while True:
                    rules, done, errno_ = nft_batch.parse_rule_bodies(sock.recv(1 << 20))
                    for ch, comment, expressions, userdata in rules:
                        bodies[(ch, comment)] = (expressions, userdata)
                    if errno_:
                        raise KernelError(f"nf_tables: reading encoded rules failed: {os.strerror(errno_)}")
                    if done:
                        break
            return bodies

        return thread.call(call)

    def commit_rules(self, changes: builtins.list[nft_batch.DeleteRule | nft_batch.AppendRule]) -> None:
        """Delete and append rules in one transaction, straight to nf_tables, from this context's thread (so
        the commit is this engine's, as `thread_id` says). KernelError when the kernel refuses any of it:
        then nothing was applied (a batch is atomic)."""
        self._seq += len(changes) + 2
        first = self._seq - len(changes) - 1

        def call() -> None:
            if self._commit_sock is None:
                self._commit_sock = _open_socket()
            sock = self._commit_sock
            data, seqs = nft_batch.rule_batch(changes, first)
            pending = set(seqs)
            failed: list[int] = []
            try:
                sock.send(data)
                while pending:
                    acks, _ = nft_batch.parse_acks(sock.recv(1 << 16))
                    for seq, err in acks:
                        pending.discard(seq)
                        if err:
                            failed.append(err)
            except OSError as e:  # no answer: whether it was applied is unknown (the caller reads the kernel)
                self._commit_sock = None
                sock.close()
                raise KernelError(f"nf_tables did not acknowledge the rule batch: {e}") from None
            if failed:
                raise KernelError(
                    f"nf_tables refused the rule batch ({len(changes)} changes); nothing was changed: "
                    f"{os.strerror(failed[0])}"
                )

        self._thread.call(call)

    def close(self) -> None:
        if self._stage is not None:
            thread, ctx, sock = self._stage
            sock.close()
            thread.call(lambda: self._lib.nft_ctx_free(ctx))
            thread.close()
            self._stage = None
        if self._commit_sock is not None:
            self._commit_sock.close()
        self._sock.close()
        ctx = self._ctx
        if ctx:
            self._thread.call(lambda: self._lib.nft_ctx_free(ctx))
            self._ctx = 0
        self._thread.close()


def _trim(err: str, limit: int = 2000) -> str:
    err = err.strip()
    return err if len(err) <= limit else err[:limit] + " ..."


# Rule ids straight from the kernel (one chain, without libnftables' whole-table cache): see codec/nft_rules.py.


def _read_rule_ids(
    sock: socket.socket, family: str, table: str, chain: str, seq: int
) -> list[tuple[int, str]]:
    """Dump one chain. Must run where `sock` was made (any thread; the socket fixes the namespace)."""
    sock.send(nft_rules.dump_request(family, table, chain, seq))
    out: list[tuple[int, str]] = []
    while True:
        data = sock.recv(1 << 20)
        rules, done, err = nft_rules.parse_dump(data)
        out.extend(rules)
        if err == errno.ENOENT:
            return []
        if err:
            raise KernelError(f"nf_tables: dumping chain {family} {table} {chain} failed: {os.strerror(err)}")
        if done:
            return out


def _read_generation(sock: socket.socket, seq: int) -> int:
    sock.send(nft_rules.generation_request(seq))
    while True:
        gen, err = nft_rules.parse_generation(sock.recv(65536))
        if gen is not None:
            return gen
        if err:
            raise KernelError(f"nf_tables: reading the ruleset generation failed: {os.strerror(err)}")


SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>, Linux 5.14+


def _namespace_id() -> str | None:
    """The calling thread's network namespace: this boot's id and the namespace's cookie, which the kernel
    never gives to another namespace until it reboots (an inode number can be reused by a re-created one).
    None on a kernel without cookies: then no generation is trusted (everything is read, as before)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            cookie = struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return None
    return f"{boot}:{cookie}"


def _open_socket() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    s.bind((0, 0))
    s.settimeout(5)
    return s
