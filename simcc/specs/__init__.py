"""Describe: validated hardware profiles and workloads."""
