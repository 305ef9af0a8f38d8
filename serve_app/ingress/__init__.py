"""The HTTP ingress: routes, request parsing, schemas, auth, PNG encoding. Never imports
torch, diffusers or PIL (tests/unit/test_layout.py)."""
