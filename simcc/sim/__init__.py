"""Simulate: a discrete-event (simpy) replay of a costed plan across devices and links."""
