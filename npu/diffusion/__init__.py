"""Stable Diffusion 1.5 with LCM on the host and the card: AXERA's sd1.5-lcm layout, step by step."""
