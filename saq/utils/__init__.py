"""Run-directory files, result tables, loggers and small helpers."""
