"""The torch-free core both sides use: settings, job types and schemas, job store, storage,
tenants, queueing, the frame grid, token and audio checks. Imports nothing else of ours.
"""
