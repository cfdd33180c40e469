"""A small teacher zoo trained here (``eupe teachers train``), for recipes whose teachers cannot be downloaded."""
