"""`enginepy serve`: an HTTP server (FastAPI + uvicorn) over the step engine. See app.py for the API."""

# A generation request is a prompt and a few numbers: 64 KiB is far above any prompt the token limit allows
# (512 T5 tokens) and small enough that a flood of large bodies cannot cost memory.
MAX_BODY_BYTES = 64 * 1024
