"""Production stage: the Batch API on Celery and RabbitMQ, its Redis store and workers, the
shared response cache, and API keys as records (a key store, per-key limits and usage). Imports
``lmref.core``, ``lmref.serving`` and ``lmref.models``."""
