"""Benchmarks: aotpack side by side with eager diffusers and the torch.compile + hotswap recipe."""
