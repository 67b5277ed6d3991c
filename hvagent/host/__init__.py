"""Facts about the machine this code runs on, and the one way to start a process on it.

The image builder and the agent both import this package (and nothing else of the
agent's except its schema modules), so what it knows is stated once: the QEMU binary,
whether KVM really runs a guest here, how a subprocess is started, logged and bounded.
"""
