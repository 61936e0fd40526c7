"""Packages at rest: the manifest, package references, the Hub and file stores, push/pull, model cards."""
