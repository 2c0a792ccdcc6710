"""simcc: hardware-aware simulator and cost model for conditional-computation networks."""

__version__ = "0.1.0"
