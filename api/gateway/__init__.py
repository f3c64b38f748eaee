"""The Flask gateway: app factory, one blueprint per resource, auth, errors, OpenAPI.

Imports the torch-free core only (`shared.core`); never the model code, the workers or the client.
"""

from api.gateway.app import create_app

__all__ = ["create_app"]
