"""This machine: GPU arch and versions against a package or target, the C++ toolchain, `aotpack doctor`."""
