"""Kernels XLA does not ship, called through its FFI."""
