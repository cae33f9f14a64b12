"""Fetching AXERA's compiled models on the device and turning them into bundles the engine loads."""
