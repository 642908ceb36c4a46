"""Pure codecs: bytes or text that the kernel, libvirt or a VM wrote, read into values (bounded, never
raising on hostile input), and the messages hyperfence writes. No I/O."""
