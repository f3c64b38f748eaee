"""The client side: the HTTP client, the `heartcluster` CLI and the local-cluster launcher.

The only part of `api/` that may reach `shared.ml`, and only for local one-shot runs.
"""
