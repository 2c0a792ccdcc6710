"""Calibrate: fit measured kernels into a hardware profile, and check predictions against them."""
