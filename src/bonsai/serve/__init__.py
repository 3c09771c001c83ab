"""`bonsai serve`: a local web UI plus native, A1111- and OpenAI-compatible HTTP APIs over one job queue.

Needs the "serve" extra (FastAPI, uvicorn): pip install 'bonsai-diffusion[serve]'."""
