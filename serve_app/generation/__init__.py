"""The generation core, below every way in: request schemas and their validation, call
planning, and GenerationService. The HTTP routes (serve_app.ingress) and the job consumer
(serve_app.jobs) both use it; it imports neither, nor the model or batching packages, nor
torch, diffusers or PIL (tests/unit/test_layout.py)."""
