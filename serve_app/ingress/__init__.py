"""The HTTP ingress: routes, body parsing, auth, streams, the OpenAI API. Never imports
torch, diffusers or PIL (tests/unit/test_layout.py)."""
