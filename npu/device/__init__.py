"""The NPU cards seen from the host: readings (temperature, memory, CMM, load) and resets."""
