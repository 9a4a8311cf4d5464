"""The verifiable synthetic task suite: SFT data, RL rewards and evaluation items share it."""
