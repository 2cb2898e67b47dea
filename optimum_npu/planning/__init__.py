"""Capacity planning on the simulated NPU: compile from a config alone (meta device), price runs
with the device's cost model, and answer "which configuration should I deploy?"."""
