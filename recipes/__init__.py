"""Build recipes, one TOML file per target. Loaded by `aotpack.recipe`."""
