"""Everything between the wire and a batch: CLI, config, HTTP dialects, validation, tokenization
workers, the scheduler, executors and metrics. Depends on ``infercore.models``."""
