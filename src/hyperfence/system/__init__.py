"""Operating-system primitives the adapters share: a thread inside a network namespace, netlink sockets
opened there, private files and directories. No knowledge of hyperfence's model."""
