"""Run: compiled programs bound to weights, the LoRA slot bank, the diffusers pipeline, jobs."""
