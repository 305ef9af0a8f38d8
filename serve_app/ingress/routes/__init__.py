"""The HTTP routes, one small module per protocol over the services (as KServe's endpoint
classes sit over its data plane): native.py (the stable-diffusion-ipex API, probes,
images), streams.py (Server-Sent Events), jobs.py (async jobs), openai.py (OpenAI's Images
API). No logic of their own: authorize, read the body (parsing.read_request), call a
service, shape the response."""
