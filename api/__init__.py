"""The HTTP side of heartcluster: `api.gateway` (the Flask app) and `api.client` (HTTP client, CLI,
local launcher). The two never import each other's modules: the client speaks to the gateway over
HTTP only.
"""
