"""Measure: real torch kernels and collectives on this machine."""
