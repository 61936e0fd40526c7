"""The Flux model and what a build makes of it: checkpoint loading, the tiny and random models,
LoRA slots, FP8 quantization, attention backends and the regions programs are cut into."""
