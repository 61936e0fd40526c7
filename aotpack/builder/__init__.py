"""Build: export the slotted regions, compile them with AOTInductor, validate, write the package."""
