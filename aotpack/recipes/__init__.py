"""Targets: one TOML recipe per GPU (shipped inside the package) and the loader that checks them."""
