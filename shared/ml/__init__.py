"""Model code and pipelines (torch): HeartMuLa, HeartCodec, the generation engine, the
transcriber, and the plain pipeline functions workers and local runs call. Imports `shared.core`
only; knows nothing of Celery or Flask.
"""
