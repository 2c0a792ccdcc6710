"""`simcc search`: the fastest layouts of a training workload that fit, and the time-cost front."""
