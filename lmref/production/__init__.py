"""Production stage: the Batch API on Celery and RabbitMQ, its Redis store and workers, and
the shared response cache. Imports ``lmref.core``, ``lmref.serving`` and ``lmref.models``."""
