"""What a run reports: ``logger`` (the package logger), ``metrics`` (the log line, tflops/MFU, JSONL), ``reporter``
(one step's outputs to every sink), ``alerts`` (Feishu/webhook alerts and the hang watchdog), ``tensorboard``,
``profiler``, ``metrics_history`` (``metrics.jsonl`` across resumes) and ``step_clock`` (each step's own time)."""
